"""Random-weight but real pretrained folders, written offline, for tests and benchmarks.

A T5 encoder + sentencepiece tokenizer (transformers' folder layout), an SD-style VAE (diffusers'
AutoencoderKL), a whole diffusers PixArt pipeline folder (model_index.json, transformer/, text_encoder/,
tokenizer/, vae/, scheduler/) that both this project and diffusers.PixArtAlphaPipeline load, a CLIP folder and
pytorch-fid's Inception weights layout. Nothing is downloaded. Each folder writer fills a folder once (a second
call on the same folder returns at once).

    python tools/random_weights.py t5 weights/tiny-t5
    python tools/random_weights.py t5 work/t5 --d-model 64 --vocab-size 400 --corpus data/shapes
    python tools/random_weights.py vae weights/tiny-vae
"""

import functools
import io
import random
import tempfile
from pathlib import Path

import sentencepiece as spm
import torch

from common.notices import quiet_library_notices

quiet_library_notices()  # transformers and diffusers, imported below on first use, import torchao

COLOURS = ("red green blue yellow orange purple black white pink brown grey golden silver cyan magenta violet "
           "turquoise crimson beige navy olive maroon teal").split()
SHAPES = ("circle square triangle star hexagon ring cross heart diamond oval rectangle pentagon cube sphere "
          "cylinder cone pyramid spiral arrow crescent").split()
WORDS = ("a an the on of in with and small large big tiny bright dark over under next to near photo painting "
         "picture drawing background sky field sea forest city mountain river garden window table floor wall "
         "light shadow morning evening night sunset cloud snow rain old new soft sharp smooth rough glowing "
         "wooden metal glass paper stone made from standing sitting floating flying beside behind between "
         "inside outside several many two three four five detailed realistic simple abstract colourful "
         "portrait landscape close view high quality style render art scene quick brown fox jumps lazy dog zebra "
         "jazz vivid calm quiet empty crowded street road bridge tower castle house boat train plane bird fish "
         "cat horse tree flower leaf grass sand beach desert lake ocean moon sun planet space robot person woman "
         "man child holding wearing looking toward against across above below around through").split()
PUNCTUATION = (",", ".", "!", "?", ":", ";", "-", "'", "(", ")", "&", "@", "/", "0", "1", "2", "9")


def _sentences(n: int = 400, seed: int = 0) -> list[str]:
    """Captions like 'a small red circle beside two golden stars', deterministic."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words = []
        for _ in range(rng.randint(3, 6)):
            words += [rng.choice(WORDS), rng.choice(COLOURS), rng.choice(SHAPES)]
            if rng.random() < 0.5:
                words.append(rng.choice(WORDS))
            if rng.random() < 0.3:
                words.append(rng.choice(PUNCTUATION))
        out.append(" ".join(words))
    return out


def caption_words(captions) -> list[str]:
    """The distinct lower-case words of some captions, sorted."""
    from models.text_encoder import words_of

    return sorted(set().union(*map(words_of, captions)))


@functools.cache
def tiny_spiece_model(vocab_size: int = 256, corpus: tuple[str, ...] = ()) -> bytes:
    """A sentencepiece unigram model with T5's special ids (pad 0, eos 1, unk 2, no bos), trained in memory on
    generic captions plus `corpus`; every word of `corpus` is one piece (a user-defined symbol "▁word")."""
    model = io.BytesIO()
    whole_words = ["\u2581" + w for w in caption_words(corpus)]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_sentences() + list(corpus)), model_writer=model, model_type="unigram",
        user_defined_symbols=whole_words,
        vocab_size=vocab_size,
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, pad_piece="<pad>", eos_piece="</s>", unk_piece="<unk>",
        character_coverage=1.0, hard_vocab_limit=False, num_threads=1, minloglevel=2)
    return model.getvalue()


def write_tiny_tokenizer(folder: str | Path, vocab_size: int = 256, corpus: tuple[str, ...] = ()) -> Path:
    """A T5 tokenizer folder (spiece.model, tokenizer.json, tokenizer_config.json) that AutoTokenizer loads."""
    from transformers import T5Tokenizer

    folder = Path(folder)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "spiece.model").write_bytes(tiny_spiece_model(vocab_size, tuple(corpus)))
        # transformers 5: T5Tokenizer(vocab_file=...) ignores the file; from_pretrained converts spiece.model
        tokenizer = T5Tokenizer.from_pretrained(tmp, extra_ids=0)
        tokenizer.save_pretrained(folder)
    return folder


def write_tiny_t5(folder: str | Path, d_model: int = 32, seed: int = 0, num_layers: int = 2, num_heads: int = 2,
                  d_ff: int = 64, d_kv: int = 16, vocab_size: int = 256, corpus: tuple[str, ...] = (),
                  device: str = "cpu", dtype: torch.dtype = torch.float32) -> Path:
    """A real transformers T5 encoder folder (random weights; default 2 layers, 2 heads, d_ff 64) + tokenizer
    (sentencepiece of `vocab_size` pieces trained on generic captions plus `corpus`). device: where the random
    weights are drawn (a GPU draws T5-XXL's 4.7B in a second); dtype: how they are stored."""
    from transformers import AutoTokenizer, T5Config, T5EncoderModel

    folder = Path(folder)
    if (folder / "config.json").is_file() and (folder / "tokenizer.json").is_file():
        return folder
    write_tiny_tokenizer(folder, vocab_size, tuple(corpus))
    vocab_size = len(AutoTokenizer.from_pretrained(folder, local_files_only=True))
    config = T5Config(vocab_size=vocab_size, d_model=d_model, d_ff=d_ff, d_kv=d_kv, num_layers=num_layers,
                      num_heads=num_heads,
                      feed_forward_proj="gated-gelu", dropout_rate=0.0, is_encoder_decoder=False, use_cache=False)
    torch.manual_seed(seed)
    with torch.device(device):
        model = T5EncoderModel(config)
    model.to(dtype).save_pretrained(folder)
    return folder


def write_tiny_vae(folder: str | Path, block_out_channels=(8, 8, 16, 16), seed: int = 0, layers_per_block: int = 1,
                   norm_num_groups: int = 8, scaling_factor: float = 0.18215) -> Path:
    """A real diffusers AutoencoderKL folder: 4 latent channels, 1/8 resolution like the SD and SDXL VAEs (4 levels);
    scaling_factor 0.18215 is the SD VAE's config, 0.13025 the SDXL VAE's (PixArt-Sigma).

    block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32 is the SD VAE's size.
    """
    from diffusers import AutoencoderKL

    folder = Path(folder)
    if (folder / "config.json").is_file():
        return folder
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=tuple(block_out_channels),
        layers_per_block=layers_per_block, down_block_types=("DownEncoderBlock2D",) * len(block_out_channels),
        up_block_types=("UpDecoderBlock2D",) * len(block_out_channels),
        norm_num_groups=norm_num_groups, sample_size=32, scaling_factor=scaling_factor)
    vae.save_pretrained(folder)
    return folder


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP byte-level BPE alphabet: printable bytes stand for themselves, the rest map to U+0100 on."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), 256)]
    extra = iter(range(256, 512))
    return {b: chr(b) if b in printable else chr(next(extra)) for b in range(256)}


def write_tiny_clip(folder: str | Path, seed: int = 0, image_size: int = 32) -> Path:
    """A transformers CLIP folder (CLIPModel + CLIPProcessor: vocab.json, merges.txt, preprocessor config) with
    random weights: 2-layer text and vision towers of width 32, a byte-level BPE vocabulary with a few merges."""
    import json

    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    folder = Path(folder)
    if (folder / "config.json").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    chars = list(_bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    merges = ["r e", "re d</w>", "c i", "ci r", "cir c", "circ l", "circl e</w>", "a t</w>", "t h", "th e</w>"]
    for pair in merges:
        vocab.setdefault(pair.replace(" ", ""), len(vocab))
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
    special = dict(bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
                   pad_token_id=vocab["<|endoftext|>"])
    config = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, **special),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=image_size, patch_size=8),
        projection_dim=16)
    torch.manual_seed(seed)
    CLIPModel(config).save_pretrained(folder)
    processor = CLIPImageProcessor(size={"shortest_edge": image_size},
                                   crop_size={"height": image_size, "width": image_size})
    CLIPProcessor(image_processor=processor, tokenizer=tokenizer).save_pretrained(folder)
    return folder


def write_fid_inception(path: str | Path, seed: int = 0) -> Path:
    """A random-weight file in the layout of pytorch-fid's pt_inception-2015-12-05-6726825d.pth (a bare state
    dict with torchvision's Inception-v3 names, a 1008-class fc, no num_batches_tracked)."""
    from evaluation.inception import FIDInception

    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, value in FIDInception().state_dict().items():
        if name.endswith("num_batches_tracked"):
            continue
        if name.endswith("running_var"):
            state[name] = torch.rand(value.shape, generator=gen) + 0.5
        elif name.endswith("running_mean"):
            state[name] = torch.randn(value.shape, generator=gen) * 0.1
        elif value.ndim == 1:
            state[name] = torch.randn(value.shape, generator=gen) * 0.5
        else:  # He-scaled conv kernels keep activations in range through 90 layers
            state[name] = torch.randn(value.shape, generator=gen) * (2.0 / value[0].numel()) ** 0.5
    state["fc.weight"] = torch.randn(1008, 2048, generator=gen) * 0.01
    state["fc.bias"] = torch.zeros(1008)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return path


def write_random_pipeline(folder: str | Path, transformer_sd: dict, transformer_cfg, t5: dict | None = None,
                          vae: dict | None = None, scheduler: str = "dpm", prediction: str = "eps") -> Path:
    """A diffusers PixArt pipeline folder around given transformer weights (official keys), with a random T5
    (d_model = the transformer's caption_channels) and a random VAE; t5 / vae are keyword arguments of
    write_tiny_t5 / write_tiny_vae. scheduler: "dpm" (PixArt-alpha) or "lcm" (PixArt-LCM)."""
    from models.pipeline_folder import scheduler_config, write_pipeline_folder

    folder = Path(folder)
    with tempfile.TemporaryDirectory() as tmp:
        t5_dir = write_tiny_t5(Path(tmp) / "t5", d_model=transformer_cfg.caption_channels, **(t5 or {}))
        vae_dir = write_tiny_vae(Path(tmp) / "vae", **(vae or {}))
        return write_pipeline_folder(folder, transformer_sd, transformer_cfg, t5_dir, t5_dir, vae_dir,
                                     scheduler_config(scheduler, prediction))


def corpus_of(data_dir: str | Path) -> list[str]:
    """The captions of a data folder: metadata.jsonl lines, else the .txt files."""
    import json

    folder = Path(data_dir)
    if (folder / "metadata.jsonl").is_file():
        lines = (folder / "metadata.jsonl").read_text(encoding="utf-8").splitlines()
        return [json.loads(line)["caption"] for line in lines if line.strip()]
    captions = [p.read_text(encoding="utf-8").strip() for p in sorted(folder.rglob("*.txt"))]
    if not captions:
        raise SystemExit(f"error: {folder} has no metadata.jsonl and no .txt captions to train a tokenizer on")
    return captions


def write_known_words(folder: str | Path, captions: list[str]) -> Path:
    """known_words.txt: the words of the captions a model is trained on (the text encoder warns about others)."""
    from models.text_encoder import KNOWN_WORDS_FILE

    path = Path(folder) / KNOWN_WORDS_FILE
    path.write_text("\n".join(caption_words(captions)) + "\n", encoding="utf-8")
    return path


def main(argv=None) -> int:
    """Command line: write a random T5 (+ tokenizer) or VAE folder."""
    import argparse

    parser = argparse.ArgumentParser(description="Write random-weight model folders in their real formats (nothing "
                                                 "is downloaded).")
    sub = parser.add_subparsers(dest="what", required=True)
    t5 = sub.add_parser("t5", help="a T5 encoder + sentencepiece tokenizer (a frozen random text encoder)")
    t5.add_argument("out", help="folder to write (left as is when it already holds a T5)")
    t5.add_argument("--d-model", type=int, default=64, help="feature width (the transformer's caption_channels)")
    t5.add_argument("--layers", type=int, default=2, help="encoder layers")
    t5.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    t5.add_argument("--vocab-size", type=int, default=256, help="sentencepiece unigram pieces (an upper bound)")
    t5.add_argument("--corpus", metavar="DATA_DIR",
                    help="also train the tokenizer on this data folder's captions, each of their words one piece, "
                         "and write known_words.txt (prompts with other words get a warning)")
    vae = sub.add_parser("vae", help="an AutoencoderKL with 4 latent channels and 1/8 resolution")
    vae.add_argument("out", help="folder to write")
    args = parser.parse_args(argv)
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # a bar over one tiny shard is noise
    if args.what == "t5":
        corpus = corpus_of(args.corpus) if args.corpus else []
        path = write_tiny_t5(args.out, d_model=args.d_model, num_layers=args.layers, seed=args.seed,
                             d_ff=4 * args.d_model, d_kv=max(8, args.d_model // 2), vocab_size=args.vocab_size,
                             corpus=tuple(corpus))
        if corpus:
            write_known_words(path, corpus)
    else:
        path = write_tiny_vae(args.out)
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
