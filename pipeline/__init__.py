"""Text-to-image generation on top of diffusion/ (the maths): planning and checking a request, loading weights,
encoding prompts, sampling, decoding. `pipeline.config` holds the `sample:` config section and imports nothing heavy.
"""
