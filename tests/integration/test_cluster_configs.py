"""Everything under cluster/ is what a user applies, so it is checked against the real schemas and parsers
(no Ray cluster needed, a few seconds):

- every YAML file parses; the Serve configs (local, production, and the RayService's serveConfigV2)
  validate with Ray's own `ServeDeploySchema` and their app args + user_configs load into ServeSettings;
- the `ray up` YAML validates against the autoscaler's JSON schema shipped inside the Ray wheel;
- KubeRay manifests: rayVersion and every image tag are the installed Ray's version, token auth is on,
  the PVCs they mount exist;
- every `sora ...` / `python -m pipelines...` command in the RayJobs and in cluster/README.md parses
  with the real `sora` argparse parser, and `ray job submit` / `serve deploy` lines with Ray's own CLI;
  the data the train job reads is what the prepare job writes, in the recipe's buckets;
- the local-cluster scripts are valid bash, answer --help, and pass shellcheck where it is installed.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import ray
import yaml

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "cluster"
KUBERAY = CLUSTER / "kuberay"
IMAGE_ROOT = "/home/ray/sora"  # where cluster/kuberay/Dockerfile puts the checkout
RAY_KINDS = {"RayCluster", "RayJob", "RayService"}
MODULE_COMMANDS = {
    "pipelines.cli": [],
    "pipelines.train.trainer": ["train"],
    "pipelines.data.prepare": ["data", "prepare"],
    "pipelines.data.synth": ["data", "synth"],
}
"""`python -m MODULE ARGS` == `sora PREFIX ARGS` (each module's __main__ calls the same parser)."""


def all_yaml() -> list[Path]:
    return sorted(p for p in CLUSTER.rglob("*") if p.suffix in (".yaml", ".yml"))


def docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def kuberay_resources() -> list[tuple[str, dict]]:
    return [(p.name, d) for p in sorted(KUBERAY.glob("*.yaml")) for d in docs(p) if d.get("kind") in RAY_KINDS]


def cluster_spec(resource: dict) -> dict:
    spec = resource["spec"]
    return {"RayCluster": spec, "RayJob": spec.get("rayClusterSpec"), "RayService": spec.get("rayClusterConfig")}[
        resource["kind"]
    ]


def pod_templates(spec: dict) -> list[dict]:
    return [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec.get("workerGroupSpecs", [])]


def serve_configs() -> dict[str, dict]:
    rayservice = next(d for _, d in kuberay_resources() if d["kind"] == "RayService")
    return {
        "serve/local.yaml": yaml.safe_load((CLUSTER / "serve" / "local.yaml").read_text()),
        "serve/production.yaml": yaml.safe_load((CLUSTER / "serve" / "production.yaml").read_text()),
        "serve/production-14b.yaml": yaml.safe_load((CLUSTER / "serve" / "production-14b.yaml").read_text()),
        "kuberay/rayservice.yaml:serveConfigV2": yaml.safe_load(rayservice["spec"]["serveConfigV2"]),
    }


def parser():
    from pipelines.cli import build_parser

    return build_parser()


def sora_argv(command: str) -> list[str] | None:
    """The `sora` argv of one shell command (`sora ...` or `python -m pipelines... ...`), else None."""
    tokens = shlex.split(command)
    if tokens[:1] == ["sora"]:
        return tokens[1:]
    if tokens[:2] == ["python", "-m"] and len(tokens) > 2 and tokens[2] in MODULE_COMMANDS:
        return MODULE_COMMANDS[tokens[2]] + tokens[3:]
    return None


def parse_sora(command: str):
    argv = sora_argv(command)
    assert argv is not None, f"not a sora command: {command}"
    try:
        return parser().parse_args(argv)
    except SystemExit as err:  # argparse reports and exits on a bad flag or a missing argument
        raise AssertionError(f"`{command}` does not parse with the sora CLI (exit {err.code})") from None


def shell_commands(script: str) -> list[str]:
    """Simple commands of a shell line (split on && ; |), after a `--` that hands the rest to a job."""
    out = []
    for part in re.split(r"&&|;|\|\|", script):
        part = part.strip()
        if " -- " in part:
            part = part.split(" -- ", 1)[1].strip()
        if part:
            out.append(part)
    return out


# ---------------------------------------------------------------------------------------------
# YAML and Serve configs
# ---------------------------------------------------------------------------------------------


def test_all_yaml_parses():
    files = all_yaml()
    names = {str(p.relative_to(CLUSTER)) for p in files}
    expected = {
        "runtime_env.yaml",
        "serve/local.yaml",
        "serve/production.yaml",
        "serve/production-14b.yaml",
        "ray-up/gpu-cluster.yaml",
        "kuberay/raycluster.yaml",
        "kuberay/rayjob-prepare.yaml",
        "kuberay/rayjob-train.yaml",
        "kuberay/rayservice.yaml",
        "kuberay/storage.yaml",
    }
    assert expected <= names, expected - names
    for p in files:
        assert docs(p), f"{p} is empty"


SERVE_CONFIGS = [
    "serve/local.yaml",
    "serve/production.yaml",
    "serve/production-14b.yaml",
    "kuberay/rayservice.yaml:serveConfigV2",
]


@pytest.mark.parametrize("name", SERVE_CONFIGS)
def test_serve_config_validates_with_rays_schema(name, monkeypatch):
    from ray.serve.schema import ServeDeploySchema

    monkeypatch.setenv("SORA_API_KEYS", "{%s: pro}" % ("a" * 64))  # production reads key digests from this Secret

    from pipelines.serve.config import GENERATOR_NAME, INGRESS_NAME, load_settings

    config = serve_configs()[name]
    schema = ServeDeploySchema.model_validate(config)
    (app,) = schema.applications
    assert app.import_path == "pipelines.serve.app:app_builder"
    assert {d.name for d in app.deployments} <= {INGRESS_NAME, GENERATOR_NAME}
    # The app's args and every deployment's user_config together are one valid ServeSettings tree: a typo
    # in a key (or a bad value) fails here, not when the replicas start on the cluster.
    merged = dict(app.args)
    for d in app.deployments:
        if isinstance(d.user_config, dict):
            merged.update(d.user_config)
    load_settings(merged)


def test_serve_import_path_resolves():
    from pipelines.serve import app

    assert callable(app.app_builder)


def test_production_serve_config_is_gpu_and_autoscaled():
    from pipelines.serve.config import GENERATOR_NAME

    configs = serve_configs()
    prod = configs["serve/production.yaml"]
    assert configs["kuberay/rayservice.yaml:serveConfigV2"] == prod, (
        "rayservice serveConfigV2 must equal serve/production.yaml"
    )
    gen = next(d for d in prod["applications"][0]["deployments"] if d["name"] == GENERATOR_NAME)
    assert gen["ray_actor_options"]["num_gpus"] >= 1
    auto = gen["autoscaling_config"]
    assert 1 <= auto["min_replicas"] < auto["max_replicas"]
    assert gen["max_ongoing_requests"] >= gen["user_config"]["batching"]["max_batch_size"]


def test_14b_serve_config_reserves_one_gpu_per_rank_of_an_8_gpu_replica(monkeypatch):
    """The checks a replica makes when it starts (pipelines/parallel/replica.py), made here on the file."""
    from pipelines.parallel.replica import rank_bundles
    from pipelines.serve.config import GENERATOR_NAME, load_settings

    monkeypatch.setenv("SORA_API_KEYS", "{%s: pro}" % ("a" * 64))
    (app,) = serve_configs()["serve/production-14b.yaml"]["applications"]
    settings = load_settings(
        {**app["args"], **{k: v for d in app["deployments"] for k, v in d.get("user_config", {}).items()}}
    )
    assert (settings.parallel.sequence, settings.parallel.cfg, settings.parallel.world_size) == (4, True, 8)
    gen = next(d for d in app["deployments"] if d["name"] == GENERATOR_NAME)
    bundles = gen["placement_group_bundles"]
    ranks, device = rank_bundles(bundles, settings.parallel, settings.device)
    assert device == "cuda" and len(ranks) == 8 and "max_replicas_per_node" not in gen
    # The replica actor takes bundle 0: its resources must fit there (Serve refuses the deployment otherwise).
    assert gen["ray_actor_options"]["num_cpus"] <= bundles[0]["CPU"] and "num_gpus" not in gen["ray_actor_options"]
    assert gen["placement_group_strategy"] == "STRICT_PACK"
    assert gen["user_config"]["batching"]["max_batch_size"] <= gen["max_ongoing_requests"]


# ---------------------------------------------------------------------------------------------
# ray up
# ---------------------------------------------------------------------------------------------


def test_ray_up_yaml_validates_against_the_wheels_autoscaler_schema():
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((CLUSTER / "ray-up" / "gpu-cluster.yaml").read_text())
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)
    validate_config(prepare_config(config))  # Ray's own check after it fills in the provider defaults

    assert config["docker"]["image"].startswith(f"rayproject/ray:{ray.__version__}-py")
    assert config["docker"]["image"].endswith("-gpu")
    types = config["available_node_types"]
    gpu_types = [t for t in types.values() if t["resources"].get("GPU", 0) > 0]
    assert gpu_types and all(t["max_workers"] > t.get("min_workers", 0) for t in gpu_types)
    setup = " ".join(config["setup_commands"])
    assert "pip install" in setup and "~/sora" in setup and config["file_mounts"]["~/sora"] == "."
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        assert any("RAY_AUTH_MODE=token" in c and "ray start" in c for c in config[key]), key


# ---------------------------------------------------------------------------------------------
# KubeRay
# ---------------------------------------------------------------------------------------------


def test_kuberay_versions_images_auth_and_volumes():
    resources = kuberay_resources()
    assert {d["kind"] for _, d in resources} == RAY_KINDS
    claims = {d["metadata"]["name"] for d in docs(KUBERAY / "storage.yaml") if d["kind"] == "PersistentVolumeClaim"}
    base = re.search(r"^FROM (\S+)$", (KUBERAY / "Dockerfile").read_text(), re.M).group(1)
    assert base.startswith(f"rayproject/ray:{ray.__version__}-py"), base
    for name, d in resources:
        spec = cluster_spec(d)
        assert spec["rayVersion"] == ray.__version__, name
        assert spec["authOptions"]["mode"] == "token", name
        gpus = 0
        for template in pod_templates(spec):
            for c in template["spec"]["containers"]:
                tag = c["image"].rsplit(":", 1)[1]
                assert tag == base.rsplit(":", 1)[1], (
                    f"{name}: {c['image']} is not the image of the Dockerfile ({base})"
                )
                gpus += int(c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0))
            for v in template["spec"].get("volumes", []):
                if "persistentVolumeClaim" in v:
                    assert v["persistentVolumeClaim"]["claimName"] in claims, f"{name}: unknown PVC {v}"
        assert gpus > 0, f"{name} has no GPU worker group"
        for g in spec["workerGroupSpecs"]:
            assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"], (name, g["groupName"])


def job_commands(name: str) -> list[str]:
    (job,) = [d for n, d in kuberay_resources() if n == name]
    return shell_commands(job["spec"]["entrypoint"])


def test_rayjob_entrypoints_parse_and_match_the_recipe():
    from pipelines.train.recipe import load_recipe

    prepares = [parse_sora(c) for c in job_commands("rayjob-prepare.yaml")]
    (train,) = [parse_sora(c) for c in job_commands("rayjob-train.yaml")]
    assert all(a.command == "data" and a.data_command == "prepare" for a in prepares)
    assert train.command == "train"

    recipe_path = train.recipe.replace(IMAGE_ROOT, str(ROOT))
    recipe = load_recipe(recipe_path)
    # The train job reads exactly what the prepare job writes, one folder per stage, in the stage's bucket.
    assert train.data.split(",") == [a.out for a in prepares]
    assert [(a.frames, a.resolution) for a in prepares] == [(s.frames, s.resolution) for s in recipe.stages]
    model = recipe.model_config()
    for a in prepares:
        assert tuple(int(x) for x in a.patch.split("x")) == tuple(model.patch_size)
        assert a.text_encoder == recipe.text_encoder.name_or_path
        assert a.max_text_length == recipe.text_encoder.max_length
        assert a.text_hidden_layer == recipe.text_encoder.hidden_layer
        assert a.autoencoder_path == recipe.autoencoder.path
    assert train.workers == recipe.workers
    gpus = sum(
        int(c["resources"]["limits"].get("nvidia.com/gpu", 0)) * g["maxReplicas"]
        for _, d in kuberay_resources()
        if d["metadata"]["name"] == "sora-train"
        for g in cluster_spec(d)["workerGroupSpecs"]
        for c in g["template"]["spec"]["containers"]
    )
    assert gpus >= train.workers, f"{gpus} GPUs for {train.workers} workers"
    # The device is declared, and each GPU pod has the CPUs its workers ask for, with some left for reads.
    assert recipe.device == "cuda" and train.device in (None, "cuda")
    for _, d in kuberay_resources():
        if d["metadata"]["name"] != "sora-train":
            continue
        for g in cluster_spec(d)["workerGroupSpecs"]:
            for c in g["template"]["spec"]["containers"]:
                per_pod = int(c["resources"]["limits"].get("nvidia.com/gpu", 0))
                if per_pod:
                    assert recipe.cpus_per_worker * per_pod < float(c["resources"]["limits"]["cpu"])

    # Serving reads the export the train job writes.
    prod = serve_configs()["serve/production.yaml"]
    assert prod["applications"][0]["args"]["model"] == f"{train.run_dir}/export"


# ---------------------------------------------------------------------------------------------
# runtime_env, README, scripts
# ---------------------------------------------------------------------------------------------


def test_runtime_env_is_valid_and_keeps_the_upload_small():
    from ray.runtime_env import RuntimeEnv

    env = yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text())
    RuntimeEnv(**env)  # Ray's own validation of the fields
    excludes = set(env["excludes"])
    assert {"/.git/", "/.venv/", "/data/", "/runs/"} <= excludes
    assert "DS_ACCELERATOR" not in env.get("env_vars", {}), "would force DeepSpeed onto the CPU on GPU clusters"


def readme_lines() -> list[str]:
    """Command lines of the README's ```bash blocks, continuation lines joined."""
    text = (CLUSTER / "README.md").read_text()
    lines = []
    for block in re.findall(r"```(?:bash|sh|console)\n(.*?)```", text, re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        lines += [ln.strip() for ln in joined.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    return lines


def test_readme_commands_are_real():
    from ray.dashboard.modules.job.cli import submit as job_submit
    from ray.serve.scripts import deploy as serve_deploy

    lines = readme_lines()
    assert lines, "cluster/README.md has no ```bash blocks"
    seen = {"sora": 0, "ray job submit": 0, "serve deploy": 0}
    for line in lines:
        line = line.split(" #", 1)[0]
        for command in re.split(r"&&|;|\|\|", line):
            command = command.strip().removeprefix("time ")
            head, _, job = command.partition(" -- ")
            tokens = shlex.split(head)
            while tokens and re.match(r"^[A-Z_]+=", tokens[0]):  # leading VAR=value assignments
                tokens.pop(0)
            if tokens[:3] == ["ray", "job", "submit"]:
                job_submit.make_context("submit", tokens[3:] + (["--", *shlex.split(job)] if job else []))
                seen["ray job submit"] += 1
                assert job, f"no entrypoint: {command}"
                for c in shell_commands(job):
                    if sora_argv(c) is not None:
                        parse_sora(c)
                        seen["sora"] += 1
            elif tokens[:2] == ["serve", "deploy"]:
                serve_deploy.make_context("deploy", tokens[2:])
                assert not tokens[2].startswith("cluster/") or (ROOT / tokens[2]).is_file(), tokens[2]
                seen["serve deploy"] += 1
            elif tokens[:1] == ["sora"] or tokens[:2] == ["python", "-m"] and sora_argv(" ".join(tokens)) is not None:
                parse_sora(shlex.join(tokens))
                seen["sora"] += 1
            for ref in re.findall(r"cluster/[\w./-]+\.(?:ya?ml|sh)", command):
                assert (ROOT / ref).is_file(), f"README names {ref}, which does not exist"
    assert all(seen.values()), seen


@pytest.mark.parametrize("script", ["start.sh", "stop.sh"])
def test_local_cluster_scripts(script):
    path = CLUSTER / "local" / script
    assert path.stat().st_mode & 0o111, f"{script} is not executable"
    text = path.read_text()
    assert "set -euo pipefail" in text
    subprocess.run(["bash", "-n", str(path)], check=True)
    out = subprocess.run([str(path), "--help"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and "Usage:" in out.stdout
    bad = subprocess.run([str(path), "--no-such-flag"], capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2 and "unknown option" in bad.stderr
    if shutil.which("shellcheck"):
        lint = subprocess.run(["shellcheck", str(path)], capture_output=True, text=True)
        assert lint.returncode == 0, lint.stdout
