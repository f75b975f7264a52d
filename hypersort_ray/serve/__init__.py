"""Ray Serve endpoint for latent-conditioned segmentation.

* :mod:`hypersort_ray.serve.app` -- the deployment (FastAPI ingress), ``run_server`` (``hypersort serve``)
  and ``build_app`` (Serve config files).
* :mod:`hypersort_ray.serve.validation` -- upload checks: NIfTI header guard, bounded gunzip, what inference
  will allocate (padded, resampled shape; memory), strict latents.
* :mod:`hypersort_ray.serve.middleware` -- Host/Origin/token/content-type/body-size guards before the
  multipart parser, and the ingress guard for Serve's proxy.
* :mod:`hypersort_ray.serve.auth` -- the fail-closed token plan (digest to replicas, bind check).
* :mod:`hypersort_ray.serve.deadline` -- per-request deadlines and cancellation inside inference threads.
* :mod:`hypersort_ray.serve.wire` -- the one error shape, request ids, scrubbing.
* :mod:`hypersort_ray.serve.results` -- mask encoding (NIfTI, zip, 4D) and the model's identity.
* :mod:`hypersort_ray.serve.schemas` -- response models (OpenAPI) and the builder's ``BuildArgs``.

Only ``app`` imports Ray; the others are plain Python and are unit-tested without it.
"""
