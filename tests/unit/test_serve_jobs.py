"""The typed boundary between the dispatcher and the generator (pipelines/serve/jobs.py): a job's params are parsed
from its row once, pass whole over the Ray handle, and survive a pickle round trip (what a Serve handle does)."""

from __future__ import annotations

import dataclasses
import pickle

import pytest

from pipelines.serve.api import GenerationParams, new_job, params_from_doc, params_to_doc
from pipelines.serve.jobs import JobOutcome, LeasedJob
from pipelines.serve.metrics import JobReport

PARAMS = GenerationParams(
    prompt="a red circle moving left",
    num_frames=8,
    height=32,
    width=48,
    steps=4,
    guidance_scale=2.0,
    seed=3,
    sampler="euler",
    negative_prompt=None,
    fps=8,
    model="sora-ray",
    lora="style",
    image="ab" * 32,
)


def claimed_row(params: dict) -> dict:
    """A job as db.claim returns it: new_job's fields plus the lease columns."""
    job = new_job(PARAMS)
    job.update(_params=params, _lease_token="t" * 32, _attempts=2, _deadline_ns=123, _retries=[])
    return job


def test_params_round_trip_through_the_row_form() -> None:
    doc = params_to_doc(PARAMS)
    assert doc["width"] == 48 and doc["lora"] == "style"  # plain JSON values, what the row's doc stores
    assert params_from_doc(doc) == PARAMS
    assert new_job(PARAMS)["_params"] == doc  # the API stores exactly that form


def test_a_row_from_another_version_is_one_line_naming_the_field() -> None:
    with pytest.raises(ValueError, match="unknown field 'frame_rate'"):
        params_from_doc({**params_to_doc(PARAMS), "frame_rate": 8})
    missing = params_to_doc(PARAMS)
    del missing["seed"]
    with pytest.raises(ValueError, match="seed"):
        params_from_doc(missing)


def test_leased_job_is_built_once_from_the_claimed_row_and_is_frozen() -> None:
    job = LeasedJob.claimed(claimed_row(params_to_doc(PARAMS)), lease_ttl_s=5.0, retention_s=None, alone=True)
    assert job.params == PARAMS and job.token == "t" * 32 and job.attempt == 2 and job.deadline_ns == 123
    assert job.alone and job.lease_ttl_s == 5.0
    assert job.params.shape_key == PARAMS.shape_key  # what the generator groups a batch by
    with pytest.raises(dataclasses.FrozenInstanceError):
        job.token = "other"  # type: ignore[misc]
    assert pickle.loads(pickle.dumps(job)) == job  # crosses the Ray handle whole


def test_outcome_crosses_the_handle_with_its_report() -> None:
    report = JobReport(queue_wait_s=0.5, call=True, batch_size=2, step_s=[0.1, 0.2])
    done = JobOutcome(ok=True, batch_id="b1", batch_size=2, seconds=1.5, report=report)
    back = pickle.loads(pickle.dumps(done))
    assert back == done and back.report.step_s == [0.1, 0.2] and not back.skipped
    failed = JobOutcome.failed("generation failed: x", "invalid_request")
    assert not failed.ok and failed.code == "invalid_request" and failed.report is None
