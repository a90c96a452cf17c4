"""Serving: an OpenAI Videos API on Ray Serve, with jobs in a database and clips in a store (dispatch.py has the
longer map of a job's way from request to clip).

- The application: `app.py` (the VideoAPI ingress's routes and the builders), `web.py` (the FastAPI app, its
  OpenAI-shaped error handlers and request counters), `commands.py` (`sora serve`, `sora generate`), `generate.py`
  (one clip locally).
- The HTTP surface: `requests.py` (bodies, multipart, text checks), `resolve.py` (a request checked against the
  limits and the model: -> GenerationParams), `params.py` (ModelCard, GenerationParams and their row form),
  `api.py` (job objects as the API renders them, result-cache keys, byte ranges), `errors.py`, `auth.py` (keys,
  owners, exposure), `admission.py` (queue shares and quotas).
- Settings: `config.py` (ServeSettings, its loading), `policy.py` (its sections: limits, tiers and keys, queue,
  batching).
- Job state: `schema.py` (tables, SQL dialects, migrations), `db.py` (JobDB: the queries, leases and fencing),
  `jobs.py` (what crosses the dispatcher -> generator Ray boundary), `dispatch.py` (claims, leases, retries),
  `sweep.py` (expiry, deadlines, orphaned objects), `metrics.py` (Prometheus).
- The generator: `generator.py` (the deployment: loading, batching, sampling), `finish.py` (a sampled clip encoded,
  stored under its lease token, the job completed), `timing.py` (where a pipeline call's time goes),
  `identity.py` (what decides a clip besides its request).
- Clips: `store.py` (fsspec content store), `files.py` (signed downloads from a folder store), `streaming.py`
  (bounded streams through Serve).
"""
