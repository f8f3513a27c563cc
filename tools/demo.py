"""A browser demo of the text-to-image pipeline: the few-step student beside its teacher, with ControlNet.

    pip install -e ".[demo]"
    python tools/demo.py                                  # the shipped shapes models on http://127.0.0.1:7860
    python tools/demo.py --config pixart_delta_lcm_1024 --pipeline weights/PixArt-LCM-XL-2-1024-MS --device cuda
    python tools/demo.py --control-checkpoint BRANCH.safetensors   # a control-map upload (ControlNet)

The page: a prompt and the generate button at the top left, the results beside them (a gallery of one image per
seed, shown enlarged with nearest-neighbour pixels; the true-size PNGs to download), the teacher's images beside
the student's with both times, the control map beside the result with its edges drawn over the first image,
clickable examples, and every error and warning in the page, naming the field it is about. Requests queue (one
generation at a time; Cancel stops one between images); sizes, steps and image counts are limited for the device
the server runs on (the page says how), or by --max-side / --max-steps.

The weights load once. The HTTP API (gradio_client) exposes /generate: (prompt, sampler, steps, guidance, seed,
width, height[, control image]) -> one true-size PNG, with the same checks (an error is raised with the message).
"""

import argparse
import copy
import logging
import math
import re
import sys
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path

log = logging.getLogger("demo")
ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = "lcm_shapes"            # the shipped LCD student (LCM 4 steps, no guidance)
TEACHERS = {"lcm_shapes": "shapes_teacher", "dmd_shapes_4step": "shapes_teacher"}  # shown beside a student preset
DISPLAY_SIDE = 256                        # images are enlarged to about this many pixels per side for the page
EDGE_COLOUR = (255, 0, 255)               # the control map's edges drawn over the result
EXAMPLE_PROMPTS = ["a large red circle at the center", "a small blue square at the top left",
                   "a large green triangle at the center and a small yellow circle at the bottom right",
                   "a medium purple cross at the top right", "a cat riding a bicycle on the moon"]
CSS = """
.pixelated img { image-rendering: pixelated; image-rendering: crisp-edges; }
#messages, #times { min-height: 1.2em; }
#header p { margin: 0; }
.caption p { margin: 0; font-size: 0.85em; }
"""


class FieldError(Exception):
    """A request the page refuses; the message names the field as the page labels it."""


class Cancelled(Exception):
    """The request was cancelled from its page (between two images)."""


@dataclass
class Limits:
    """What one request may ask for on this server."""

    max_side: int
    max_steps: int
    max_images: int
    device: str

    def describe(self) -> str:
        return (f"Limits on this server ({self.device}): width and height 8-{self.max_side} px, 1-{self.max_steps} "
                f"steps, 1-{self.max_images} images per request.")


def device_limits(device: str, base_side: int, max_side: int | None, max_steps: int | None) -> Limits:
    """Limits that keep one request to seconds on this device: on a CPU twice the model's own size at most 256 px
    (a 512x512 XL image takes about 90 s on 2 cores) and 8 images; on a GPU up to 2048 px and 16 images."""
    cpu = not device.startswith("cuda")
    side = max_side or (min(2 * base_side, 256) if cpu else min(2 * base_side, 2048))
    return Limits(side, max_steps or 50, 8 if cpu else 16, "CPU" if cpu else f"GPU {device}")


# ----------------------------------------------------------------------------------------------------------
# Messages as the page shows them

FIELD_NAMES = {  # config keys and command-line flags in pipeline messages -> the page's field labels
    "sample.guidance": "Guidance", "--guidance": "Guidance", "sample.steps": "Steps", "--steps": "Steps",
    "sample.seed": "Seed", "--seed": "Seed", "sample.width": "Width", "--width": "Width", "sample.height": "Height",
    "--height": "Height", "sample.sampler": "Sampler", "--sampler": "Sampler", "sample.max_pixels": "the size limit",
    "--control-scale, control.scale": "Control strength", "control.scale": "Control strength",
    "--control-scale": "Control strength", "--control": "Control map", "sample.images_per_prompt": "Images",
}
_PATH = re.compile(r"(?<![\w.])(?:/[\w.\-+@~]+)+/?")


def page_text(message: str) -> str:
    """A message fit for the page: config keys and flags replaced by field labels, server paths by file names."""
    for key in sorted(FIELD_NAMES, key=len, reverse=True):
        message = message.replace(key, FIELD_NAMES[key])
    return _PATH.sub(lambda m: Path(m.group(0)).name or "a folder", message)


class WarningCollector(logging.Handler):
    """The warnings logged by one thread while it serves a request (the pipeline warns through logging)."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.thread = threading.get_ident()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.thread == self.thread:
            self.messages.append(page_text(record.getMessage()))


# ----------------------------------------------------------------------------------------------------------
# Models


class Engine:
    """One model of the page (the student, or the teacher beside it): its config, text encoder, transformer,
    optional ControlNet branch and autoencoder, loaded once."""

    def __init__(self, cfg, name: str):
        from models.autoencoder import load_autoencoder
        from models.compiled import compile_module
        from models.quantize import quantize_transformer
        from models.text_encoder import load_text_encoder
        from pipeline.generate import load_denoiser, plan, text_encoder_config

        self.cfg, self.name = cfg, name
        s = cfg.sample
        request = plan(cfg, ["a test prompt"])  # checks every file before anything loads
        self.model_cfg = request.model_cfg
        self.base_side = request.gen_size[0]
        self.text_encoder = load_text_encoder(text_encoder_config(cfg), s.device)
        # Quantised and compiled below: a ControlNet branch is built from the float base, and wrapped before compiling.
        plain = copy.deepcopy(cfg)
        plain.sample.compile, plain.sample.quantize = False, "none"
        self.model = load_denoiser(plain, request)
        self.controlled = None
        if cfg.control.checkpoint:  # the base steered by its ControlNet branch, for requests with a control map
            from models.checkpoint import CheckpointError, peek
            from models.controlnet import ControlledPixArt, load_branch
            from models.shipped import content_hash
            from pipeline.generate import check_control_branch, int8_base_message, stored_compute_mode

            stored = stored_compute_mode(peek(s.checkpoint))
            if stored != "none":
                raise CheckpointError(int8_base_message(s.checkpoint, stored))
            check_control_branch(cfg, request.model_cfg)
            branch = load_branch(cfg.control.checkpoint, self.model, cfg.control, content_hash(s.checkpoint))
            branch = branch.to(device=s.device, dtype=next(self.model.parameters()).dtype)
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
        self.distilled = "teacher" in peek_metadata(s.checkpoint)

    def setting(self) -> str:
        s = self.cfg.sample
        guidance = "no guidance" if s.guidance <= 1 else f"guidance {s.guidance:g}"
        return f"{s.sampler.upper() if s.sampler == 'lcm' else s.sampler} {s.steps} steps, {guidance}"

    def draw(self, prompt: str, seed: int, width: int, height: int, control, control_scale: float,
             sampler: str | None = None, steps: int | None = None, guidance: float | None = None):
        """One image (3, H, W) in [0, 1] and its control map at the generated size ((3, H, W) in [-1, 1] or None);
        sampler/steps/guidance default to the engine's config. UserError for a request the pipeline refuses."""
        import torch

        from common.errors import UserError
        from data.control_maps import control_map
        from pipeline.generate import Timings, encode_prompts, plan, sample_images

        cfg = copy.deepcopy(self.cfg)
        s = cfg.sample
        s.sampler = sampler or s.sampler
        s.steps = steps or s.steps
        s.guidance = s.guidance if guidance is None else guidance
        s.seed, s.width, s.height, s.images_per_prompt, s.batch_size = seed, width, height, 1, 1
        cfg.control.scale = control_scale
        request = plan(cfg, [prompt])
        model = self.model
        if control is not None:
            if self.controlled is None:
                raise UserError("this server has no ControlNet branch: start it with --control-checkpoint FILE")
            cfg.control.check(self.model_cfg.dims()[0])
            request = replace(request, control=control_map(control, "none", request.gen_size,
                                                           name="the control map")[None])
            model = self.controlled
        with torch.inference_mode():  # (grad mode is per thread: set here, in gradio's worker thread)
            prompts = encode_prompts(self.text_encoder, s, request.prompts, request.model_cfg.caption_channels)
            images = sample_images(model, self.vae, self.schedule, s, request, prompts, Timings(), progress=False,
                                   prediction=cfg.diffusion.prediction, control_scale=cfg.control.scale)
        return images[0], (request.control[0] if request.control is not None else None)


def peek_metadata(path) -> dict:
    from models.checkpoint import peek

    return peek(path).metadata


# ----------------------------------------------------------------------------------------------------------
# Requests


@dataclass
class Request:
    """A checked request of the page."""

    prompt: str
    images: int
    seed: int
    width: int
    height: int
    steps: int
    guidance: float
    sampler: str
    control: object            # a PIL image or None
    control_scale: float
    compare: bool


def whole_number(value, field: str, low: int, high: int, hint: str = "") -> int:
    """A field's value as an int in low..high, or FieldError naming the field."""
    if value is None or (isinstance(value, str) and not value.strip()):
        raise FieldError(f"{field} is empty: enter a whole number from {low} to {high}{hint}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise FieldError(f"{field} must be a whole number from {low} to {high}, got {value!r}") from None
    if not math.isfinite(number) or number != int(number):
        raise FieldError(f"{field} must be a whole number from {low} to {high}, got {value}")
    if not low <= number <= high:
        raise FieldError(f"{field} must be in {low}..{high}{hint}, got {int(number)}")
    return int(number)


def read_control(path) -> object:
    """The uploaded control map as an RGB PIL image; FieldError for a file that is not an image."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.load()
            if image.width * image.height > 64_000_000:
                raise FieldError(f"Control map: {image.width}x{image.height} pixels is too large; upload an image "
                                 f"of at most a few megapixels")
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
        raise FieldError("Control map: the uploaded file is not an image this server can read; upload a PNG or "
                         "JPEG edge map (white lines on black), e.g. one of the examples") from None


class Demo:
    """The page's models and its checked, queued generation."""

    def __init__(self, student: Engine, teacher: Engine | None, limits: Limits):
        self.student, self.teacher, self.limits = student, teacher, limits
        self.lock = threading.Lock()  # one generation at a time: the models are shared

    @property
    def cfg(self):
        return self.student.cfg

    def check(self, prompt, images, seed, width, height, steps, guidance, sampler, control_path, control_scale,
              compare) -> Request:
        """Every field, before anything runs; FieldError names the field as the page labels it."""
        from pipeline.generate import SEED_LIMIT

        lim = self.limits
        if not isinstance(prompt, str) or not prompt.strip():
            raise FieldError("Prompt is empty: describe the image, e.g. \"a large red circle at the center\"")
        images = whole_number(images, "Images", 1, lim.max_images, " on this server")
        seed = whole_number(seed, "Seed", 0, SEED_LIMIT - images)
        width = whole_number(width, "Width", 8, lim.max_side, " pixels on this server")
        height = whole_number(height, "Height", 8, lim.max_side, " pixels on this server")
        steps = whole_number(steps, "Steps", 1, lim.max_steps, " on this server")
        if guidance is None or (isinstance(guidance, str) and not guidance.strip()):
            raise FieldError("Guidance is empty: enter a number >= 0 (0 or 1: no guidance)")
        guidance = float(guidance)
        if not math.isfinite(guidance) or guidance < 0:
            raise FieldError(f"Guidance must be a finite number >= 0 (0 or 1: no guidance), got {guidance}")
        if sampler not in ("lcm", "dpm", "ddim"):
            raise FieldError(f"Sampler must be lcm, dpm or ddim, got {sampler!r}")
        if sampler == "lcm" and steps > 50:
            raise FieldError(f"Steps: the LCM sampler takes 1..50 steps, got {steps}")
        from models.config import MAX_SCALE

        control_scale = 1.0 if control_scale is None else float(control_scale)
        if not (math.isfinite(control_scale) and 0 <= control_scale <= MAX_SCALE):
            raise FieldError(f"Control strength must be in 0..{MAX_SCALE:g}, got {control_scale}")
        control = None
        if control_path is not None:
            if self.student.controlled is None:
                raise FieldError("Control map: this server has no ControlNet branch, so it cannot use one")
            control = read_control(control_path)
        return Request(prompt.strip(), images, seed, width, height, steps, guidance, sampler, control, control_scale,
                       bool(compare) and self.teacher is not None)

    def warnings(self, r: Request) -> list[str]:
        """What the page says before drawing: words the model never saw, a control map that will be resized, CFG
        on a distilled student."""
        from models.text_encoder import clean_caption, listing

        out = []
        encoder = self.student.text_encoder
        text = clean_caption(r.prompt) if encoder.cfg.clean_captions else r.prompt
        unknown = encoder.unknown_words(text)
        if unknown:
            out.append(f"Prompt: the model never saw {listing(unknown)} in training; "
                       f"{'that word does' if len(unknown) == 1 else 'those words do'} not steer the image")
        if r.control is not None and r.control.size != (r.width, r.height):
            out.append(f"Control map: resized from {r.control.width}x{r.control.height} to {r.width}x{r.height}, the "
                       f"image size (upload a map of the image size to keep its lines exact)")
        if r.sampler == "lcm" and r.guidance > 1 and self.student.distilled:
            out.append(f"Guidance {r.guidance:g} with the LCM sampler on this distilled student: its teacher's "
                       f"guidance is distilled in, so more over-saturates the image; use 0")
        return out

    def run(self, r: Request, on_image=None, stop: threading.Event | None = None) -> dict:
        """Draw every seed with the student (and the teacher); on_image(which, index) after each image; a set
        `stop` ends the request before its next image (Cancelled).
        Returns {"student": [...], "teacher": [...], "times": {...}, "control": map or None, "warnings": [...]}."""
        out = {"student": [], "teacher": [], "times": {"student": 0.0, "teacher": 0.0}, "control": None}
        collector = WarningCollector()
        logging.getLogger().addHandler(collector)
        try:
            with self.lock:
                engines = [("student", self.student)] + ([("teacher", self.teacher)] if r.compare else [])
                for which, engine in engines:
                    for i in range(r.images):
                        if stop is not None and stop.is_set():
                            done = len(out["student"]) + len(out["teacher"])
                            log.info("request cancelled from its page after %d of %d images", done,
                                     r.images * len(engines))
                            raise Cancelled(f"cancelled after {done} images")
                        start = time.perf_counter()
                        custom = {} if which == "teacher" else dict(sampler=r.sampler, steps=r.steps,
                                                                    guidance=r.guidance)
                        image, control = engine.draw(r.prompt, r.seed + i, r.width, r.height, r.control,
                                                     r.control_scale, **custom)
                        out["times"][which] += time.perf_counter() - start
                        out[which].append(image)
                        out["control"] = control if control is not None else out["control"]
                        if on_image is not None:
                            on_image(which, i)
        finally:
            logging.getLogger().removeHandler(collector)
        out["warnings"] = [w for w in dict.fromkeys(collector.messages) if "resizing it" not in w]
        return out


# ----------------------------------------------------------------------------------------------------------
# Pictures for the page


def to_pil(image):
    """(3, H, W) float in [0, 1] -> 8-bit RGB PIL image."""
    from PIL import Image

    return Image.fromarray(image.mul(255).round().byte().permute(1, 2, 0).numpy())


def enlarged(image, side: int = DISPLAY_SIDE):
    """A PIL image scaled by a whole factor with nearest-neighbour pixels, to about `side` pixels on its long side."""
    from PIL import Image

    factor = max(1, side // max(image.size))
    return image.resize((image.width * factor, image.height * factor), Image.NEAREST)


def edge_overlay(image, control):
    """The control map's lines (bright pixels of the map, (3, H, W) in [-1, 1]) drawn over an image (3, H, W)."""
    edges = (control.mean(0) > 0.0)  # (H, W): the map's bright pixels
    painted = image.clone()
    for c, value in enumerate(EDGE_COLOUR):
        painted[c][edges] = value / 255
    return to_pil(painted)


def save_pngs(images: list, folder: Path, stem: str, seed: int) -> list[str]:
    """True-size PNGs for download: folder/STEM_seedN.png."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, image in enumerate(images):
        path = folder / f"{stem}_seed{seed + i}.png"
        to_pil(image).save(path)
        paths.append(str(path))
    return paths


# ----------------------------------------------------------------------------------------------------------
# The page


def build_app(demo: Demo):
    import tempfile

    import gradio as gr

    from common.errors import UserError

    s, lim = demo.cfg.sample, demo.limits
    downloads = Path(tempfile.mkdtemp(prefix="pixart-demo-"))
    examples_dir = ROOT / "docs" / "examples"
    controls = sorted(examples_dir.glob("*.png")) if demo.student.controlled is not None else []

    def message_box(errors: list[str], warnings: list[str], note: str = "") -> str:
        lines = [f"**Error:** {e}" for e in errors] + [f"**Warning:** {w}" for w in warnings]
        return "\n\n".join(lines + ([note] if note else []))

    stops: dict[str, threading.Event] = {}  # per browser session: set by its Cancel button

    def cancel(request: gr.Request):
        if request.session_hash in stops:
            stops[request.session_hash].set()

    def draw(prompt, images, seed, width, height, steps, guidance, sampler, compare, control_path, control_scale,
             request: gr.Request,
             progress=gr.Progress()):  # noqa: B008 (gradio injects the progress tracker through this default)
        """The page's generate: yields the results (Cancel stops the request before its next image)."""
        nothing = [], [], None, None, None
        stop_event = stops[request.session_hash] = threading.Event()
        try:
            r = demo.check(prompt, images, seed, width, height, steps, guidance, sampler, control_path,
                           control_scale, compare)
        except FieldError as e:
            yield message_box([str(e)], []), *nothing, ""
            return
        warnings = demo.warnings(r)
        total = r.images * (2 if r.compare else 1)
        progress((0, total), desc="queued" if demo.lock.locked() else "drawing", unit="images")
        try:
            result = demo.run(r, on_image=lambda which, i: progress(
                (i + 1 + (r.images if which == "teacher" else 0), total), desc=f"drawing ({which})", unit="images"),
                stop=stop_event)
        except UserError as e:
            yield message_box([page_text(str(e))], warnings), *nothing, ""
            return
        except Cancelled:
            yield message_box([], warnings, "Cancelled."), *nothing, ""
            return
        warnings += result["warnings"]
        request_dir = downloads / f"{time.time_ns()}"
        files = save_pngs(result["student"], request_dir, "student", r.seed)
        files += save_pngs(result["teacher"], request_dir, "teacher", r.seed)
        student = [(enlarged(to_pil(im)), f"seed {r.seed + i}") for i, im in enumerate(result["student"])]
        teacher = [(enlarged(to_pil(im)), f"seed {r.seed + i}") for i, im in enumerate(result["teacher"])]
        control = overlay = None
        if result["control"] is not None:
            control = enlarged(to_pil((result["control"] + 1) / 2))
            overlay = enlarged(edge_overlay(result["student"][0], result["control"]))
        times = (f"Student ({r.sampler} {r.steps} steps): {result['times']['student']:.2f} s for {r.images} "
                 f"image{'s' if r.images > 1 else ''}")
        if r.compare:
            times += (f" · Teacher ({demo.teacher.setting()}): {result['times']['teacher']:.2f} s "
                      f"({result['times']['teacher'] / max(result['times']['student'], 1e-9):.1f}x the student)")
        yield message_box([], warnings), student, teacher, control, overlay, files, times

    def preview(path):
        """The uploaded control map, enlarged; a bad upload says so in the messages."""
        if path is None:
            return None, ""
        try:
            return enlarged(read_control(path)), ""
        except FieldError as e:
            return None, message_box([str(e)], [])

    def api_generate(prompt, sampler, steps, guidance, seed, width, height, control=None):
        """/generate for scripts: one true-size image; a bad request raises its message."""
        try:
            r = demo.check(prompt, 1, seed, width, height, steps, guidance, sampler, control, 1.0, False)
            result = demo.run(r)
        except (FieldError, UserError) as e:
            raise gr.Error(page_text(str(e)), print_exception=False) from None
        return to_pil(result["student"][0])

    student_label = f"Student: {demo.student.setting()} by default"
    teacher_label = f"Teacher: {demo.teacher.setting()}" if demo.teacher is not None else "Teacher"
    with gr.Blocks(title="PixArt-δ demo") as app:
        gr.Markdown(f"**PixArt-δ: text to image in a few steps.** {lim.describe()} Images are shown enlarged "
                    f"(nearest-neighbour pixels); the true-size PNGs download below the results.", elem_id="header")
        with gr.Row(equal_height=False):
            with gr.Column(scale=5, min_width=340):
                prompt = gr.Textbox(label="Prompt", value=EXAMPLE_PROMPTS[0], lines=2, max_lines=4,
                                    elem_id="prompt")
                with gr.Row():
                    button = gr.Button("Generate", variant="primary", elem_id="generate")
                    stop = gr.Button("Cancel", variant="stop", elem_id="cancel")
                with gr.Row():
                    images = gr.Number(value=4, label=f"Images (1-{lim.max_images})", precision=None, min_width=80,
                                       elem_id="images")
                    seed = gr.Number(value=s.seed, label="Seed", precision=None, min_width=80, elem_id="seed")
                    width = gr.Number(value=s.width or demo.student.base_side, label=f"Width (8-{lim.max_side})",
                                      precision=None, min_width=80, elem_id="width")
                    height = gr.Number(value=s.height or demo.student.base_side,
                                       label=f"Height (8-{lim.max_side})", precision=None, min_width=80,
                                       elem_id="height")
                with gr.Row():
                    steps = gr.Number(value=s.steps, label=f"Steps (1-{lim.max_steps})", precision=None,
                                      min_width=80, elem_id="steps")
                    guidance = gr.Number(value=s.guidance, label="Guidance (0, 1: off)", precision=None,
                                         min_width=80, elem_id="guidance")
                    sampler = gr.Dropdown(["lcm", "dpm", "ddim"], value=s.sampler, label="Sampler", min_width=80,
                                          elem_id="sampler")
                compare = gr.Checkbox(value=demo.teacher is not None, label=f"Also draw with the teacher "
                                      f"({demo.teacher.setting() if demo.teacher else 'none on this server'})",
                                      interactive=demo.teacher is not None, elem_id="compare")
                with gr.Row(visible=demo.student.controlled is not None):
                    control_file = gr.File(label="Control map (optional: an edge map, PNG or JPEG)",
                                           file_types=["image"], type="filepath", height=110, elem_id="control")
                    control_preview = gr.Image(label="Uploaded map", show_label=False, interactive=False, height=110,
                                               elem_classes="pixelated", buttons=[], elem_id="control-preview")
                control_scale = gr.Slider(0, 2, value=1.0, step=0.05, label="Control strength (0: off, 1: trained)",
                                          visible=demo.student.controlled is not None, elem_id="control-scale")
            with gr.Column(scale=7, min_width=420):
                messages = gr.Markdown(elem_id="messages")
                times = gr.Markdown(elem_id="times")
                with gr.Row(equal_height=True):
                    student = gr.Gallery(label=student_label, columns=2, height=280, object_fit="contain",
                                         elem_classes="pixelated", elem_id="student", preview=False)
                    teacher = gr.Gallery(label=teacher_label, columns=2, height=280, object_fit="contain",
                                         elem_classes="pixelated", elem_id="teacher", preview=False,
                                         visible=demo.teacher is not None)
                with gr.Row(visible=demo.student.controlled is not None):
                    with gr.Column(min_width=160):  # captions above the pictures: a label would cover a corner
                        gr.Markdown("Control map, as used (the image size)", elem_classes="caption")
                        control_view = gr.Image(show_label=False, interactive=False, height=150,
                                                elem_classes="pixelated", elem_id="control-view")
                    with gr.Column(min_width=160):
                        gr.Markdown("Its edges over the first student image", elem_classes="caption")
                        overlay_view = gr.Image(show_label=False, interactive=False, height=150,
                                                elem_classes="pixelated", elem_id="overlay")
                files = gr.File(label="True-size PNGs", file_count="multiple", interactive=False, elem_id="files")
        examples = [[p, None] for p in EXAMPLE_PROMPTS]
        examples += [[f"a large {c} {shape} at the center", str(path)] for path, c, shape in
                     zip(controls, ("blue", "red", "green"), (p.stem.split("_")[0] for p in controls))]
        gr.Examples(examples, [prompt, control_file], label="Examples (click one, then Generate)")
        inputs = [prompt, images, seed, width, height, steps, guidance, sampler, compare, control_file, control_scale]
        outputs = [messages, student, teacher, control_view, overlay_view, files, times]
        events = [trigger(draw, inputs, outputs, concurrency_limit=1, api_visibility="private",
                          show_progress_on=[student]) for trigger in (button.click, prompt.submit)]
        stop.click(cancel, None, None, cancels=events, api_visibility="private", queue=False)
        control_file.change(preview, control_file, [control_preview, messages], api_visibility="private")
        # The scripts' endpoint: hidden components, the original signature.
        api_control = gr.Image(type="filepath", visible=False)
        api_out = gr.Image(type="pil", format="png", visible=False)
        api_button = gr.Button(visible=False)
        api_button.click(api_generate, [prompt, sampler, steps, guidance, seed, width, height, api_control], api_out,
                         api_name="generate", concurrency_limit=1)
    return app


def make_engines(args, cfg):
    """The student of --config and, when one is known or given, its teacher (--teacher-config)."""
    from configs import Config, load_config

    student = Engine(cfg, "student")
    teacher_config = args.teacher_config if args.teacher_config is not None else TEACHERS.get(args.config or "")
    teacher = None
    if teacher_config and teacher_config != "none":
        tcfg = load_config(Config, teacher_config, [])
        tcfg.sample.device, tcfg.control = cfg.sample.device, replace(cfg.control)
        tcfg.control.check_base = cfg.control.check_base
        teacher = Engine(tcfg, "teacher")
    return student, teacher


def main(argv=None) -> int:
    from common.errors import UserError
    from configs import Config, add_config_arguments, load_config

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser, default=DEFAULT_CONFIG)
    parser.add_argument("--checkpoint", help="transformer weights (any format)")
    parser.add_argument("--pipeline", help="a diffusers pipeline folder: transformer, text encoder and VAE from it")
    parser.add_argument("--device", help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--control-checkpoint", help="a ControlNet branch: requests may then upload a control map")
    parser.add_argument("--teacher-config", help="a preset drawn beside the student for comparison (default: "
                                                 "shapes_teacher beside lcm_shapes; 'none': no comparison)")
    parser.add_argument("--quantize", choices=["none", "int8", "fp8"],
                        help="8-bit transformer and T5 (as sample/sample.py --quantize)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the transformer and VAE decoder")
    parser.add_argument("--host", default="127.0.0.1", help="address to serve on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--max-side", type=int, help="largest width or height a request may ask for (default: by "
                                                     "device, twice the model's size, at most 256 px on a CPU)")
    parser.add_argument("--max-steps", type=int, help="most sampler steps a request may ask for (default 50)")
    parser.add_argument("--queue-size", type=int, default=16, help="requests that may wait (default 16)")
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
        for name, value in (("--max-side", args.max_side), ("--max-steps", args.max_steps),
                            ("--queue-size", args.queue_size)):
            if value is not None and value < 1:
                raise UserError(f"{name} must be >= 1, got {value}")
        student, teacher = make_engines(args, cfg)
        limits = device_limits(cfg.sample.device, student.base_side, args.max_side, args.max_steps)
        demo = Demo(student, teacher, limits)
    except UserError as e:
        log.error("error: %s", e)
        return 2
    try:
        import gradio  # noqa: F401
    except ImportError:
        log.error("error: the demo needs gradio: pip install -e \".[demo]\"")
        return 2
    log.info("%s", limits.describe())
    app = build_app(demo)
    app.queue(max_size=args.queue_size, default_concurrency_limit=1)
    app.launch(server_name=args.host, server_port=args.port, show_error=False, css=CSS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
