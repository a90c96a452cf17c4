"""A Serve replica that owns several devices: its rank actors, their process group, and one call sampled over them.

The generator deployment with `parallel: {sequence: N, cfg: bool}` (pipelines/serve/config.py) reserves its devices
with Serve's placement-group bundles: bundle 0 holds the replica actor itself (encoding, storage, the job's lease),
bundles 1..world hold one `SamplingRank` each (one GPU on cuda, a CPU share on CPU):

    deployments:
      - name: Generator
        ray_actor_options: {num_cpus: 4}                        # a subset of bundle 0
        placement_group_bundles: [{CPU: 4}, {CPU: 2, GPU: 1}, {CPU: 2, GPU: 1}, ...]   # 1 + sequence x (2 with cfg)
        placement_group_strategy: STRICT_PACK                   # the ranks of one replica on one node (NVLink)

`ParallelRanks.start` places the ranks in those bundles, joins them in one torch.distributed world (NCCL on cuda,
gloo on CPU; rank 0's node and a free port there are the rendezvous), and has each load the export as a
`sampling.ParallelPipeline`. The replica then calls it like a `TextToVideoPipeline`: every rank samples the same
call, rank 0 decodes and hands the clips back; the replica encodes and stores them as it does for one device.
Progress comes from rank 0's step events (the replica's callback runs on the replica and may stop the call: the
ranks agree on stopping with one all-reduce per step, so they all leave at the same step).

Health covers every rank: `check` pings each one (the replica's `check_health` calls it), and a call that finds a
rank dead ends the replica at once (the surviving ranks would wait in a collective for a peer that is gone): its
in-flight jobs see a dead replica, which the ingress's dispatcher retries on the replacement Serve starts.
Autoscaling counts replicas; the ranks are plain actors, not Serve replicas.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from typing import Any

import ray
from ray.exceptions import RayActorError

from .config import RENDEZVOUS_TIMEOUT, ParallelConfig

logger = logging.getLogger("ray.serve")
POLL_S = 0.05
"""How often the replica reads rank 0's step events while a call runs: small next to any step."""
PING_TIMEOUT_S = 10.0
"""A rank that does not answer a ping this long is taken as dead (its actor serves pings beside sampling)."""
OUT_OF_STEP_S = 60.0
"""How long the replica waits for the other ranks once one failed on its own: past it they are taken to be stuck in
a collective for the failed one (gloo and NCCL would wait RENDEZVOUS_TIMEOUT), and the replica ends."""
RANK_CONCURRENCY = 4
"""Threads of a rank actor: one samples, the others answer pings, progress reads and stop requests meanwhile."""


class RanksLost(RuntimeError):
    """A rank actor of this replica died: the group cannot sample any more."""


Bundle = dict[str, float]


def rank_bundles(bundles: list[Bundle], parallel: ParallelConfig, device: str) -> tuple[list[Bundle], str]:
    """The ranks' bundles (1..world) of a replica's placement group, and the ranks' device ("cpu" or "cuda").
    A `ConfigError` naming what to write when the bundles cannot hold the ranks."""
    from sora_model.config import ConfigError

    world = parallel.world_size
    example = "[{CPU: 4}" + ", {CPU: 2, GPU: 1}" * world + "]"
    if len(bundles) != 1 + world:
        raise ConfigError(
            f"parallel: sequence {parallel.sequence}{' x cfg 2' if parallel.cfg else ''} needs the Generator "
            f"deployment's placement_group_bundles to hold 1 + {world} bundles (the replica's, then one per rank), "
            f"got {len(bundles)}; e.g. placement_group_bundles: {example}"
        )
    ranks = bundles[1:]
    gpus = [float(b.get("GPU", 0)) for b in ranks]
    if device == "auto":
        device = "cuda" if all(g >= 1 for g in gpus) else "cpu"
    if device not in ("cpu", "cuda"):
        raise ConfigError(f"device must be auto, cpu or cuda with parallel (one GPU per rank bundle), got {device!r}")
    if device == "cuda" and any(g != 1 for g in gpus):
        raise ConfigError(f"parallel on cuda needs one GPU in each rank bundle (placement_group_bundles[1:]): {gpus}")
    if any(float(b.get("CPU", 0)) <= 0 for b in ranks):
        raise ConfigError("each rank bundle (placement_group_bundles[1:]) needs a CPU share, e.g. {CPU: 1}")
    return ranks, device


@ray.remote(max_concurrency=RANK_CONCURRENCY)
class SamplingRank:
    """One rank of a replica's group: its share of every call's transformer work; rank 0 also decodes."""

    def __init__(self, rank: int, parallel: ParallelConfig, device: str) -> None:
        self.rank, self.parallel, self.device = rank, parallel, device
        self.pipe: Any = None
        self.flag_device = "cpu"  # where the per-step stop flag lives: the collective backend's device
        self.call = -1  # the running (or last) call's number: progress reads name it, so none sees another's steps
        self.events: list[tuple[int, int]] = []  # (step, total) of that call, in callback order
        self.stop_asked = False

    def rendezvous(self) -> str:
        """Where the group meets (called on rank 0): this node's address and a port free on it now."""
        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        return f"tcp://{ray.util.get_node_ip_address()}:{port}"

    def setup(self, init: str, model: str, precision: str, lora: str | None) -> dict[str, Any]:
        """Join the group (collective: every rank at once), form the sampling groups, load the export.
        Rank 0 returns what the replica needs to describe the model without holding it."""
        import torch
        import torch.distributed as dist

        from .sampling import ParallelPipeline, new_sampling_groups

        device = self.device
        if device == "cuda":  # Ray gives the actor its bundle's GPU alone (CUDA_VISIBLE_DEVICES)
            torch.cuda.set_device(0)
            device = "cuda:0"
        backend = "nccl" if device.startswith("cuda") else "gloo"
        world = self.parallel.world_size
        dist.init_process_group(backend, init_method=init, rank=self.rank, world_size=world, timeout=RENDEZVOUS_TIMEOUT)
        groups = new_sampling_groups(self.parallel)
        self.flag_device = device
        self.pipe = ParallelPipeline.load(model, device=device, precision=precision, lora=lora).parallelize(groups)
        ae = self.pipe.autoencoder
        factors = {"spatial_factor": ae.spatial_factor, "temporal_factor": ae.temporal_factor}
        return {"config": self.pipe.config, **factors, "cache": self.cache_stats()}

    def sample(self, call: int, prompts: list[str], options: dict[str, Any]) -> dict[str, Any]:
        """Call number `call` on this rank; `{"frames": (B, T, H, W, 3) uint8 on rank 0, None elsewhere,
        "stopped": whether the replica stopped it, "cache": text-cache figures}`."""
        import torch
        import torch.distributed as dist

        self.events, self.stop_asked, self.call = [], False, call

        class Stopped(Exception):
            pass

        def on_step(step: int, total: int) -> None:
            self.events.append((step, total))
            # Every rank leaves at the same step: a stop asked of any rank (the replica asks all) wins.
            flag = torch.tensor([int(self.stop_asked)], device=self.flag_device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            if flag.item():
                raise Stopped

        try:
            frames = self.pipe(prompts, callback=on_step, **options)
        except Stopped:
            return {"frames": None, "stopped": True, "cache": self.cache_stats()}
        return {"frames": frames, "stopped": False, "cache": self.cache_stats()}

    def progress(self, start: int, call: int | None = None) -> list[tuple[int, int]]:
        """Step events of call `call` (None: the last begun) from index `start` on; none while `call` has not begun."""
        return self.events[start:] if call in (None, self.call) else []

    def stop(self) -> None:
        self.stop_asked = True

    def ping(self) -> int:
        return self.rank

    def ask(self, method: str, args: tuple, kwargs: dict[str, Any]) -> Any:
        """A question to this rank's pipeline (`image_problem`, ...): what describes the model, not sampling."""
        return getattr(self.pipe, method)(*args, **kwargs)

    def set_text_cache_bytes(self, max_bytes: int) -> None:
        self.pipe.text_encoder.cache.set_max_bytes(max_bytes)

    def cache_stats(self) -> dict[str, int]:
        c = self.pipe.text_encoder.cache
        figures = {"hits": c.hits, "misses": c.misses, "size": len(c), "bytes": c.bytes}
        return {**figures, "max_bytes": c.max_bytes, "evictions": c.evictions}


class RemoteTextCache:
    """Rank 0's text-embedding cache as the replica sees it: its figures after the last call."""

    def __init__(self, ranks: ParallelRanks, stats: dict[str, int]) -> None:
        self._ranks = ranks
        self.update(stats)

    def update(self, stats: dict[str, int]) -> None:
        self.hits, self.misses, self.size = stats["hits"], stats["misses"], stats["size"]
        self.bytes, self.max_bytes, self.evictions = stats["bytes"], stats["max_bytes"], stats["evictions"]

    def __len__(self) -> int:
        return self.size

    def set_max_bytes(self, max_bytes: int) -> None:
        """Every rank's cache (each encodes the prompts it samples)."""
        ray.get([a.set_text_cache_bytes.remote(max_bytes) for a in self._ranks.actors])
        self.max_bytes = max_bytes


class _RemotePart:
    """The text encoder or autoencoder of a replica whose ranks hold the model: figures, no weights."""

    def __init__(self, **figures: Any) -> None:
        self.__dict__.update(figures)

    def encode(self, texts: list[str]) -> Any:
        raise RuntimeError("this replica's ranks hold the text encoder; it samples through ParallelRanks.__call__")

    def decode(self, latents: Any) -> Any:
        raise RuntimeError("this replica's ranks hold the autoencoder; it samples through ParallelRanks.__call__")


class ParallelRanks:
    """What a parallel replica holds instead of a `TextToVideoPipeline`: its rank actors, called the same way
    (`ranks(prompts, callback=..., **options)` -> (B, T, H, W, 3) uint8) and described by the same attributes
    (`config`, `autoencoder` factors, `text_encoder.cache` figures, an empty `model` for the adapter cache)."""

    offers_step_caches = False
    """A replica hands back decoded clips only, without step caches (see ParallelPipeline)."""

    def __init__(self, actors: list[Any], parallel: ParallelConfig, facts: dict[str, Any]) -> None:
        import torch

        self.actors, self.parallel = actors, parallel
        self.config = facts["config"]
        self.autoencoder = _RemotePart(spatial_factor=facts["spatial_factor"], temporal_factor=facts["temporal_factor"])
        self.text_encoder = _RemotePart(cache=RemoteTextCache(self, facts["cache"]))
        self.model = torch.nn.Module()  # no weights here; per-request adapters are refused with parallel (config.py)
        self._lock = threading.Lock()  # one call at a time over the group
        self._calls = 0

    @classmethod
    def start(
        cls, model: str, parallel: ParallelConfig, device: str, precision: str, lora: str | None, replica: str
    ) -> ParallelRanks:
        """Place `parallel.world_size` ranks in this replica's placement group (bundles 1..world), join them and
        load the export on each. Called in the replica's constructor; the ranks' actors are named
        `SamplingRank-<replica>-rank<r>` (`ray list actors`)."""
        from ray.util.placement_group import get_current_placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from sora_model.config import ConfigError
        from sora_model.pipeline import load_export_config

        if "://" not in model:
            parallel.check(load_export_config(model).model, field="parallel.sequence")
        group = get_current_placement_group()
        if group is None:
            world = parallel.world_size
            raise ConfigError(f"parallel needs the Generator's placement_group_bundles (1 + {world} bundles)")
        bundles, device = rank_bundles(group.bundle_specs, parallel, device)
        actors = [
            SamplingRank.options(
                name=f"SamplingRank-{replica}-rank{r}",
                num_cpus=float(b.get("CPU", 0)),
                num_gpus=float(b.get("GPU", 0)),
                scheduling_strategy=PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=r + 1),
            ).remote(r, parallel, device)
            for r, b in enumerate(bundles)
        ]
        init = ray.get(actors[0].rendezvous.remote())
        facts = ray.get([a.setup.remote(init, model, precision, lora) for a in actors])[0]
        logger.info("generator %s: %d ranks joined at %s on %s", replica, len(actors), init, device)
        return cls(actors, parallel, facts)

    def __getattr__(self, name: str) -> Any:
        """Any other pipeline method the replica asks about the model (`image_problem`, ...) is answered by rank 0."""
        actors = self.__dict__.get("actors")
        if name.startswith("_") or not actors:
            raise AttributeError(name)

        def ask(*args: Any, **kwargs: Any) -> Any:
            return ray.get(actors[0].ask.remote(name, args, kwargs))

        return ask

    def __call__(self, prompts: list[str], callback: Any = None, **options: Any) -> Any:
        """Every rank runs the call; the replica replays rank 0's step events into `callback` (which may raise to
        stop the call: the ranks are told, leave together, and the callback's exception is raised here)."""
        with self._lock:
            self._calls += 1
            refs = [a.sample.remote(self._calls, list(prompts), options) for a in self.actors]
            stopped = self._follow(refs, callback)
            results = self._remote(refs)
        if stopped is not None:
            raise stopped
        self.text_encoder.cache.update(results[0]["cache"])
        return results[0]["frames"]

    def _follow(self, refs: list[Any], callback: Any) -> BaseException | None:
        """Replay rank 0's step events into `callback` until every rank is done; the callback's exception, if it
        raised one (the ranks are asked to stop then). A dead rank, or one that failed while the others still wait
        in a collective for it (OUT_OF_STEP_S), ends the replica (`_lost`)."""
        seen, stopped, failed_at = 0, None, None
        while True:
            done, _ = ray.wait(refs, num_returns=len(refs), timeout=POLL_S)
            if len(done) < len(refs) and self._failed(done):
                failed_at = failed_at or time.monotonic()
                if time.monotonic() - failed_at > OUT_OF_STEP_S:
                    self._lost(RuntimeError(f"a rank failed and the others still wait for it after {OUT_OF_STEP_S:g}s"))
            for step, total in self._remote(self.actors[0].progress.remote(seen, self._calls)):
                seen += 1
                if stopped is None and callback is not None:
                    try:
                        callback(step, total)
                    except Exception as err:  # noqa: BLE001 - the replica's own stop (lease lost, deadline)
                        stopped = err
                        self._remote([a.stop.remote() for a in self.actors])
            if len(done) == len(refs):
                return stopped

    def _failed(self, done: list[Any]) -> bool:
        """Whether a finished rank raised (its own error: raised by `_results` once all are done)."""
        for ref in done:
            try:
                self._remote(ref, timeout=0)
            except Exception:  # noqa: BLE001
                return True
        return False

    def _remote(self, refs: Any, timeout: float | None = None) -> Any:
        """`ray.get`, where a dead rank ends the replica (`_lost`) and a rank's own error is raised as itself
        (a one-line ValueError for a request every rank refused alike, not Ray's wrapper with its traceback)."""
        try:
            return ray.get(refs, timeout=timeout)
        except RayActorError as err:
            self._lost(err)
            raise
        except ray.exceptions.RayTaskError as err:
            # A rank's error may only be a symptom of a peer that died under the same call (gloo's "Connection
            # reset by peer"): a dead rank anywhere in the call ends the replica before any rank's own error.
            if isinstance(refs, list):
                for ref in refs:
                    try:
                        ray.get(ref, timeout=0)
                    except RayActorError as dead:
                        self._lost(dead)
                        raise
                    except Exception:  # noqa: BLE001 - this rank's own error (or not done): look further
                        pass
            raise (err.cause if isinstance(err.cause, Exception) else err) from None

    def check(self) -> None:
        """Every rank answers a ping within PING_TIMEOUT_S (all asked at once); else a `RanksLost` naming the first
        that did not, which the replica's health check raises (Serve replaces the replica)."""
        refs = [a.ping.remote() for a in self.actors]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=PING_TIMEOUT_S)
        for r, ref in enumerate(refs):
            try:
                if ref not in ready:
                    raise TimeoutError(f"no answer in {PING_TIMEOUT_S:g}s")
                ray.get(ref)
            except (RayActorError, TimeoutError) as err:
                raise RanksLost(f"rank {r} of {len(refs)} is not answering: {type(err).__name__}") from None

    def _lost(self, err: BaseException) -> None:
        """A rank died under a call: the others may wait in a collective for it forever, and the jobs must not be
        failed for it. End this replica (its ranks go with it): its callers see a dead replica and retry the jobs
        on the replacement Serve starts, as they do for any replica that dies."""
        logger.error("generator: a sampling rank died (%s); ending this replica so Serve replaces it", err)
        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        try:
            ray.kill(ray.get_runtime_context().current_actor, no_restart=True)
        except Exception:  # noqa: BLE001 - outside an actor (a driver using the ranks): raise instead
            raise RanksLost(f"a sampling rank died: {err}") from None
        time.sleep(PING_TIMEOUT_S)  # the kill lands meanwhile; nothing after this may write for these jobs
        os._exit(1)

    def close(self) -> None:
        for actor in self.actors:
            ray.kill(actor, no_restart=True)
