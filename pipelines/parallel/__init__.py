"""One request across several processes: Ulysses sequence parallelism and CFG parallelism for sampling.

`config.py` (what the user asks for, checked against the model), `sampling.py` (the process groups, the hook and
the pipeline that runs one clip over them), `launch.py` (`sora generate --sequence-parallel N [--cfg-parallel]`),
`replica.py` (a Serve generator replica that owns several devices: rank actors in its placement group, health over
every rank).
"""
