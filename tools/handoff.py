"""Where a few-step student loses the teacher's quality: the student draws its first J steps (multistep LCM, as it
samples), and the teacher's guided ODE (its config's sampler, DPM-Solver from a start timestep) finishes from the
student's image re-noised to the student's next timestep. J = 0 is the teacher's own sample, J = K (the student's
steps) the student's; the step after which the score falls is where the student loses it. Scored like
`tools/evaluate.py model` on the held-out scenes (--split validation: the scenes recipes may be chosen on).

    python tools/handoff.py --student-config dmd_shapes_4step --teacher-config shapes_teacher --split validation \\
        --handoff 0 1 2 3 4 --out work/eval/handoff.md

The teacher finishes with its sample.steps in proportion to the way left (tools/make_ode_pairs.py's start_steps: 20
steps from 999, 5 from 259) and its sample.guidance; the student's re-noising draws the noise its LCM sampling
draws (the same seeds), so J = K is exactly the student's sample and J = 0 exactly the teacher's.
"""

import argparse
import logging
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from common.errors import UserError
from common.files import print_report

log = logging.getLogger("handoff")


class _Handoff(Exception):
    """Raised from the LCM sampler's callback to stop it with the re-noised image of step J."""

    def __init__(self, x: torch.Tensor):
        super().__init__()
        self.x = x


@torch.no_grad()
def handoff_latents(student, teacher, schedule, student_s, teacher_s, cond: dict, seeds: list[int], latent_hw,
                    handoff: int, prediction: str) -> torch.Tensor:
    """Latents (N, C, h, w): the student's first `handoff` LCM steps of student_s.steps, the teacher's guided
    sampler (teacher_s) from the student's next timestep."""
    from diffusion.samplers import sampler_timesteps
    from diffusion.samplers.dpm_solver import sample_dpm_solver
    from diffusion.samplers.lcm import sample_lcm
    from pipeline.generate import conditions_in_dtype, denoise_batch, guided_denoiser, initial_noise
    from tools.make_ode_pairs import start_steps

    teacher_s = replace(teacher_s, uncond="null")  # guided against its learned null caption (no negative prompt)
    k = student_s.steps
    if not 0 <= handoff <= k:
        raise UserError(f"--handoff {handoff}: the student draws {k} steps (sample.steps of the student config), so "
                        f"the hand-off is after 0..{k} of them")
    if handoff == 0:
        return denoise_batch(teacher, schedule, teacher_s, cond, seeds, latent_hw, prediction=prediction)
    if handoff == k:
        return denoise_batch(student, schedule, student_s, cond, seeds, latent_hw, prediction=prediction)
    if teacher_s.sampler != "dpm":
        raise UserError(f"the teacher finishes from a start timestep with DPM-Solver; its config samples with "
                        f"{teacher_s.sampler!r}: use --teacher-set sample.sampler=dpm")

    dtype = next(student.parameters()).dtype  # each network's inputs in its own dtype, as denoise_batch casts them
    student_cond = conditions_in_dtype(cond, dtype)
    x = initial_noise(seeds, (student.in_channels, *latent_hw), cond["y"].device, dtype)
    generators = [torch.Generator().manual_seed(seed + 1_000_003) for seed in seeds]  # as denoise_batch draws

    def stop(info):
        if info.index == handoff - 1:
            raise _Handoff(info.x)

    try:
        denoise = guided_denoiser(student, schedule, student_s, student_cond, prediction=prediction)
        sample_lcm(denoise, x, schedule, k, generator=generators, callback=stop, **student_s.sampler_options)
    except _Handoff as h:
        x = h.x
    t = int(sampler_timesteps("lcm", k, schedule.num_steps, student_s.sampler_options)[handoff])
    dtype = next(teacher.parameters()).dtype
    teacher_cond = conditions_in_dtype(cond, dtype)
    denoise = guided_denoiser(teacher, schedule, teacher_s, teacher_cond, prediction=prediction)
    steps = start_steps(teacher_s.steps, t, schedule.num_steps)
    return sample_dpm_solver(denoise, x.to(dtype), schedule, steps, start=t, **teacher_s.sampler_options)


def run(args) -> str:
    from configs import Config, load_config
    from data.synthetic import caption, render, scene_at
    from evaluation.report import evaluate_images
    from models.autoencoder import load_autoencoder
    from pipeline.generate import (
        encode_prompts,
        load_denoiser,
        load_text_encoder,
        micro_conditions,
        plan,
        text_encoder_config,
    )

    student_cfg = load_config(Config, args.student_config, args.student_set)
    teacher_cfg = load_config(Config, args.teacher_config, args.teacher_set)
    ec = student_cfg.evaluation
    seed = ec.validation_seed if args.split == "validation" else ec.seed
    for cfg in (student_cfg, teacher_cfg):  # one image per scene at the evaluation size, as tools/evaluate.py draws
        cfg.sample.width, cfg.sample.height, cfg.sample.images_per_prompt = ec.width, ec.height, 1
    if student_cfg.sample.sampler != "lcm":
        raise UserError(f"the student samples with {student_cfg.sample.sampler!r}: the hand-off follows its LCM steps "
                        f"(a config with sample.sampler: lcm, e.g. dmd_shapes_4step or lcm_shapes)")
    bad = [j for j in args.handoff if not 0 <= j <= student_cfg.sample.steps]
    if bad:
        raise UserError(f"--handoff {bad[0]}: the student draws {student_cfg.sample.steps} steps (its sample.steps), "
                        f"so the hand-off is after 0..{student_cfg.sample.steps} of them")
    scenes = [scene_at(seed, i, [(ec.width, ec.height)], ec.scene()) for i in range(ec.num_images)]
    captions = [caption(objects) for _, _, objects in scenes]
    real = [np.asarray(render(objects, w, h)) for w, h, objects in scenes]
    request = plan(student_cfg, captions)
    teacher_request = plan(teacher_cfg, captions)  # the teacher's config and checkpoint, checked before loading
    s, ts = student_cfg.sample, teacher_cfg.sample
    encoder = load_text_encoder(text_encoder_config(student_cfg), s.device)
    prompts = encode_prompts(encoder, s, request.prompts, request.model_cfg.caption_channels)
    encoder.unload()
    student, teacher = load_denoiser(student_cfg, request), load_denoiser(teacher_cfg, teacher_request)
    vae = load_autoencoder(student_cfg.autoencoder, s.device)
    schedule, prediction = student_cfg.diffusion.build(), student_cfg.diffusion.prediction
    hw = (request.gen_size[0] // vae.downsample, request.gen_size[1] // vae.downsample)
    rows = []
    for j in args.handoff:
        images = []
        for b in range(0, len(captions), s.batch_size):
            batch, seeds = request.prompts[b:b + s.batch_size], request.seeds[b:b + s.batch_size]
            y, mask = prompts.rows(batch)
            cond = {"y": y, "mask": mask, **micro_conditions(request.model_cfg, request.gen_size, len(batch),
                                                             s.device, torch.float32)}
            latents = handoff_latents(student.eval(), teacher.eval(), schedule, s, ts, cond, seeds, hw, j, prediction)
            decoded = ((vae.decode(latents).float() + 1) / 2).clamp(0, 1).cpu()
            images += [im.mul(255).round().byte().permute(1, 2, 0).numpy() for im in decoded]
        results, _ = evaluate_images(images, captions, real, progress=False)
        single = results["groups"]["single"]
        rows.append((j, single, results["frechet_distance"]))
        log.info("hand-off after %d student steps: kind %.1f, FD %.3f", j, single["kind"], results["frechet_distance"])
    attrs = ("kind", "color", "size", "position", "count")
    lines = [f"{args.split} scenes ({len(captions)}): the student ({s.checkpoint}, LCM {s.steps}) for J steps, the "
             f"teacher ({ts.checkpoint}, {ts.sampler}, guidance {ts.guidance}) from there", "",
             "| student steps J | " + " | ".join(attrs) + " | mean | FD |", "|---|" + "---|" * (len(attrs) + 2)]
    for j, single, fd in rows:
        mean = sum(single[a] for a in attrs) / len(attrs)
        lines.append(f"| {j} | " + " | ".join(f"{single[a]:.1f}" for a in attrs) + f" | **{mean:.1f}** | {fd:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--student-config", required=True, help="the student's run config (sample.sampler lcm)")
    p.add_argument("--teacher-config", required=True, help="the teacher's run config (sample.sampler dpm)")
    p.add_argument("--student-set", action="append", default=[], metavar="KEY=VALUE", help="override (repeatable)")
    p.add_argument("--teacher-set", action="append", default=[], metavar="KEY=VALUE", help="override (repeatable)")
    p.add_argument("--handoff", type=int, nargs="+", required=True, help="student steps before the teacher takes over")
    p.add_argument("--split", choices=["validation", "test"], default="test")
    p.add_argument("--out", type=Path, default=None, help="also write the table here (.md)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stdout)
    try:
        text = run(args)
    except UserError as e:
        log.error("error: %s", e)
        return 2
    print_report(text, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
