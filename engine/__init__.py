"""The one training loop every trainer (PixArt-alpha, LCM, ControlNet) runs through, and what it is made of."""
