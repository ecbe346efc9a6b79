"""A RunPod worker as its authors intend one: the runpod SDK running our scripted handler.

Started by tests as ``python runpod_worker.py --rp_serve_api --rp_api_port N --rp_api_host
127.0.0.1``, which serves runpod's own local test API.
"""

import runpod

from gpujobs.testing.handlers import scripted_handler

runpod.serverless.start({"handler": scripted_handler})
