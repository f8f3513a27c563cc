"""Training tasks: what each trainer supplies to the shared loop (engine/loop.py): its networks and their losses.

    alpha.py       PixArt-alpha: the whole transformer on the diffusion loss          (train/train.py)
    lcd.py         latent consistency distillation into a PixArt-delta student      (train/train_lcm.py)
    controlnet.py  a ControlNet branch on a frozen base                             (train/train_controlnet.py)
"""
