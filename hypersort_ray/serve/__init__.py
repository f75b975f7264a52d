"""Ray Serve endpoint for latent-conditioned segmentation.

* :mod:`hypersort_ray.serve.app` -- the deployment (FastAPI ingress), ``run_server`` (``hypersort serve``)
  and ``build_app`` (Serve config files).
* :mod:`hypersort_ray.serve.validation` -- upload checks: NIfTI header guard, bounded gunzip, latents.
* :mod:`hypersort_ray.serve.middleware` -- bearer token and body-size cap before the multipart parser.
* :mod:`hypersort_ray.serve.results` -- mask encoding (NIfTI, zip, 4D) and the model's identity.
* :mod:`hypersort_ray.serve.schemas` -- response models (OpenAPI) and the builder's ``BuildArgs``.

Only ``app`` imports Ray; the others are plain Python and are unit-tested without it.
"""
