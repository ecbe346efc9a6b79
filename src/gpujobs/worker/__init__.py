"""The reference worker: Qwen-Image-Layered behind one contract, in every deployment mode.

One container image, three ways to run it (``python -m gpujobs.worker``):

- ``DEPLOYMENT_MODE=serverless`` (the default): a RunPod Serverless handler
  (:mod:`gpujobs.worker.serverless`);
- ``DEPLOYMENT_MODE=pod``: an HTTP server with a job API, for RunPod Pods, Vast.ai and any host
  (:mod:`gpujobs.worker.pod`);
- on Modal: ``modal deploy -m gpujobs.worker.modal_app`` (:mod:`gpujobs.worker.modal_app`), a
  GPU class loading the pipeline once per container and submit/result web endpoints.

Modules: :mod:`~gpujobs.worker.schemas` (the request and response contract),
:mod:`~gpujobs.worker.service` (the one code path both modes run),
:mod:`~gpujobs.worker.pipeline` (the model), :mod:`~gpujobs.worker.fetch_weights` (fill
``MODEL_PATH`` once), :mod:`~gpujobs.worker.tiny` (a tiny random model for tests) and
:mod:`~gpujobs.worker.fake` (a torch-free stand-in for the model, a test seam).

Importing this package imports nothing: torch, diffusers, Pillow, FastAPI and the runpod SDK are
imported by the modules that need them, so ``import gpujobs.worker.pipeline`` stays cheap.
"""
