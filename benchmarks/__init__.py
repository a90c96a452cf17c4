"""Side-by-side performance measurements (issue 8). `python -m benchmarks.run [--quick] [--only NAME]`.

Every figure is a ratio of two things measured in the same process, with their repetitions
interleaved, so that load from other work on the machine hits both sides alike. Benchmarks never
fail on timing: a goal that is not met is reported, not raised.
"""
