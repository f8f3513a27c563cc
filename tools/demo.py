"""A gradio demo of the text-to-image pipeline: prompt, sampler, steps, guidance, seed and size in; an image out.

    pip install -e ".[demo]"
    python tools/demo.py                                  # the shipped shapes model on http://127.0.0.1:7860
    python tools/demo.py --config pixart_alpha_1024 --pipeline weights/PixArt-XL-2-1024-MS --device cuda
    python tools/demo.py --control-checkpoint BRANCH.safetensors   # adds a control-image upload (ControlNet)

The weights load once; every request is checked like sample/sample.py's (sampler steps, sizes, guidance) and a
bad one is answered with a message while the server keeps serving. Requests beyond --max-side pixels or
--max-steps steps are refused. The HTTP API (gradio_client) exposes the same function as /generate.
"""

import argparse
import copy
import logging
import math
import sys
import threading

log = logging.getLogger("demo")
DEFAULT_CONFIG = "lcm_shapes"  # the shipped student (LCM 4 steps, no guidance)


class Demo:
    """The loaded models of one config, and a checked generate() for one prompt."""

    def __init__(self, cfg, max_side: int, max_steps: int):
        from models.autoencoder import load_autoencoder
        from models.compiled import compile_module
        from models.quantize import quantize_transformer
        from models.text_encoder import load_text_encoder
        from pipeline.generate import load_denoiser, plan, text_encoder_config

        self.cfg, self.max_side, self.max_steps = cfg, max_side, max_steps
        s = cfg.sample
        request = plan(cfg, ["a test prompt"])  # checks every file before anything loads
        self.text_encoder = load_text_encoder(text_encoder_config(cfg), s.device)
        # Quantised and compiled below: a ControlNet branch is built from the float base, and wrapped before compiling.
        plain = copy.deepcopy(cfg)
        plain.sample.compile, plain.sample.quantize = False, "none"
        self.model = load_denoiser(plain, request)
        self.controlled = None
        if cfg.control.checkpoint:  # the base steered by its ControlNet branch, for requests with a control image
            from models.checkpoint import CheckpointError, peek
            from pipeline.generate import int8_base_message

            stored = peek(s.checkpoint).metadata.get("quantization", "none")
            if stored != "none":
                raise CheckpointError(int8_base_message(s.checkpoint, stored))
            from models.controlnet import ControlledPixArt, load_branch
            from models.shipped import content_hash
            from pipeline.generate import check_control_branch

            check_control_branch(cfg, request.model_cfg)
            branch = load_branch(cfg.control.checkpoint, self.model, cfg.control, content_hash(cfg.sample.checkpoint))
            branch = branch.to(device=cfg.sample.device, dtype=next(self.model.parameters()).dtype)
            self.controlled = quantize_transformer(ControlledPixArt(self.model, branch).eval(), s.quantize)
        quantize_transformer(self.model, s.quantize)  # (a no-op for the base inside the controlled model already)
        if s.compile:
            self.model = compile_module(self.model, "the transformer", s.device)
            if self.controlled is not None:
                self.controlled = compile_module(self.controlled, "the controlled transformer", s.device)
        self.vae = load_autoencoder(cfg.autoencoder, s.device)
        if s.compile:
            self.vae.compile()
        self.schedule = cfg.diffusion.build()
        self.lock = threading.Lock()  # one generation at a time: the models are shared

    def check(self, prompt: str, steps: int, guidance: float, width: int, height: int) -> None:
        from configs.errors import UserError

        if not prompt or not prompt.strip():
            raise UserError("the prompt is empty")
        if not math.isfinite(guidance):
            raise UserError(f"guidance must be a finite number, got {guidance}")
        if not 1 <= steps <= self.max_steps:
            raise UserError(f"steps must be in 1..{self.max_steps} on this server, got {steps}")
        for name, side in (("width", width), ("height", height)):
            if not 8 <= side <= self.max_side:
                raise UserError(f"{name} must be in 8..{self.max_side} pixels on this server, got {side}")

    def generate(self, prompt: str, sampler: str, steps: int, guidance: float, seed: int, width: int, height: int,
                 control=None):
        """A PIL image for one prompt (steered by the PIL image `control` when given); UserError for a bad request."""
        import torch
        from PIL import Image

        from configs.errors import UserError
        from data.control_maps import control_map
        from pipeline.generate import Timings, encode_prompts, plan, sample_images

        steps, seed, width, height = int(steps), int(seed), int(width), int(height)
        self.check(prompt, steps, float(guidance), width, height)
        cfg = copy.deepcopy(self.cfg)
        s = cfg.sample
        s.sampler, s.steps, s.guidance, s.seed, s.width, s.height = sampler, steps, float(guidance), seed, width, height
        s.images_per_prompt = s.batch_size = 1
        request = plan(cfg, [prompt.strip()])
        model = self.model
        if control is not None:
            if self.controlled is None:
                raise UserError("this server has no ControlNet branch: start it with --control-checkpoint FILE")
            from dataclasses import replace

            request = replace(request, control=control_map(control.convert("RGB"), "none", request.gen_size,
                                                           name="the control image")[None])
            model = self.controlled
        with self.lock, torch.inference_mode():  # (grad mode is per thread: set here, in gradio's worker thread)
            prompts = encode_prompts(self.text_encoder, s, request.prompts, request.model_cfg.caption_channels)
            images = sample_images(model, self.vae, self.schedule, s, request, prompts, Timings(),
                                   progress=False, prediction=cfg.diffusion.prediction,
                                   control_scale=cfg.control.scale)
        return Image.fromarray(images[0].mul(255).round().byte().permute(1, 2, 0).numpy())


def build_app(demo: Demo):
    import gradio as gr

    from configs.errors import UserError

    s = demo.cfg.sample

    def run(prompt, sampler, steps, guidance, seed, width, height, control=None):
        try:
            return demo.generate(prompt, sampler, steps, guidance, seed, width, height, control)
        except UserError as e:
            raise gr.Error(str(e)) from None

    with gr.Blocks(title="PixArt-delta") as app:
        gr.Markdown(f"### PixArt-delta demo: `{s.checkpoint}`")
        with gr.Row():
            with gr.Column():
                prompt = gr.Textbox(label="prompt", value="a large red circle at the center")
                sampler = gr.Dropdown(["dpm", "lcm", "ddim"], value=s.sampler, label="sampler")
                steps = gr.Number(value=s.steps, precision=0, label=f"steps (1-{demo.max_steps})")
                guidance = gr.Number(value=s.guidance, label="guidance (<= 1: off)")
                seed = gr.Number(value=s.seed, precision=0, label="seed")
                width = gr.Number(value=s.width or 256, precision=0, label="width")
                height = gr.Number(value=s.height or 256, precision=0, label="height")
                inputs = [prompt, sampler, steps, guidance, seed, width, height]
                if demo.controlled is not None:
                    inputs.append(gr.Image(type="pil", label="control image (e.g. an edge map; optional)"))
                button = gr.Button("generate")
            image = gr.Image(type="pil", label="image", format="png")
        button.click(run, inputs, image, api_name="generate")
    return app


def main(argv=None) -> int:
    from configs import Config, add_config_arguments, load_config
    from configs.errors import UserError

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser, default=DEFAULT_CONFIG)
    parser.add_argument("--checkpoint", help="transformer weights (any format)")
    parser.add_argument("--pipeline", help="a diffusers pipeline folder: transformer, text encoder and VAE from it")
    parser.add_argument("--device", help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--control-checkpoint", help="a ControlNet branch: requests may then upload a control image")
    parser.add_argument("--quantize", choices=["none", "int8", "fp8"],
                        help="8-bit transformer and T5 (as sample/sample.py --quantize)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the transformer and VAE decoder")
    parser.add_argument("--host", default="127.0.0.1", help="address to serve on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--max-side", type=int, default=1024, help="largest width or height a request may ask for")
    parser.add_argument("--max-steps", type=int, default=50, help="most sampler steps a request may ask for")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stdout)
    try:
        cfg = load_config(Config, args.config, args.overrides)
        if args.pipeline:
            cfg.sample.checkpoint = cfg.text_encoder.path = cfg.autoencoder.path = args.pipeline
        if args.checkpoint:
            cfg.sample.checkpoint = args.checkpoint
        if args.device:
            cfg.sample.device = args.device
        if args.control_checkpoint:
            cfg.control.checkpoint = args.control_checkpoint
        if args.quantize:
            cfg.sample.quantize = args.quantize
        if args.compile:
            cfg.sample.compile = True
        demo = Demo(cfg, args.max_side, args.max_steps)
    except UserError as e:
        log.error("error: %s", e)
        return 2
    try:
        import gradio  # noqa: F401
    except ImportError:
        log.error("error: the demo needs gradio: pip install -e \".[demo]\"")
        return 2
    build_app(demo).launch(server_name=args.host, server_port=args.port, show_error=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
