"""Label Studio ML backend for GPT4RoI: HTTP API, Redis/RQ job queue, GPU worker and image loading.

The API side (`backend.app`, `backend.labelstudio_backend`, `backend.labelconfig`, `backend.jobs`,
`backend.settings`) never imports torch; only `backend.worker` loads the model.
"""
