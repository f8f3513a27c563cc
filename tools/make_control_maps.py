"""Turn images into ControlNet control maps (white structure on black PNGs) with data/control_maps.py.

    python tools/make_control_maps.py photos/ maps/ --type canny
    python tools/make_control_maps.py photo.png maps/ --type hed --hed-weights ControlNetHED.pth

Each input image (a file, or every image of a folder) gives OUT/<name>.png of the same size. A map made here can
be given to sample/sample.py --control as it is (--control-type none, the default).
"""

import argparse
import logging
import sys
from pathlib import Path

log = logging.getLogger("make_control_maps")
SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", type=Path, help="an image or a folder of images")
    parser.add_argument("out", type=Path, help="output folder")
    parser.add_argument("--type", choices=["canny", "hed"], default="canny")
    parser.add_argument("--hed-weights", help="ControlNetHED.pth for --type hed (nothing is downloaded)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    from common.errors import UserError

    try:
        if args.src.is_dir():
            images = sorted(p for p in args.src.iterdir() if p.suffix.lower() in SUFFIXES)
        elif args.src.is_file():
            images = [args.src]
        else:
            raise UserError(f"{args.src} does not exist")
        if not images:
            raise UserError(f"{args.src} holds no images ({', '.join(SUFFIXES)})")
        if args.out.exists() and not args.out.is_dir():
            raise UserError(f"{args.out} is a file; the output is a folder")
        from PIL import Image

        from data.control_maps import control_map
        from data.folder import load_image

        args.out.mkdir(parents=True, exist_ok=True)
        for path in images:
            image = load_image(path)
            x = control_map(image, args.type, (image.height, image.width), hed_weights=args.hed_weights,
                            name=str(path))
            pixels = ((x + 1) * 127.5).round().clamp(0, 255).byte().permute(1, 2, 0).numpy()
            Image.fromarray(pixels).save(args.out / f"{path.stem}.png")
        log.info("wrote %d %s maps to %s", len(images), args.type, args.out)
    except UserError as e:
        log.error("error: %s", e)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
