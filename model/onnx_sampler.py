"""A small onnxruntime + numpy sampler of an ONNX export (`python -m jobs.export --format onnx`):
seeds -> the same images, captions and alignment as `model.sampling.generate` (greedy captions).

Self-contained on purpose: it imports numpy, onnxruntime and `tokenizers` only (never torch, never
the rest of inkseed), so the export folder, which holds a copy of this file, runs anywhere:

    python DIR/onnx_sampler.py DIR --seed 0 1 2 --out pngs/

    from onnx_sampler import OnnxSampler
    samples = OnnxSampler("DIR").generate([0, 1, 2])   # .images uint8 (B, S, S), .captions, .alignment

The steps are those of `generate()`:
  1. a seed's noise: `torch.randn(z_dim, generator=torch.Generator().manual_seed(seed))`,
     redone in numpy (`torch_randn`: torch's CPU mt19937 and its Box-Muller in blocks of 16),
     equal to torch's numbers within a float32 ulp (the export's parity check would show a drift);
  2. DDIM (eta = 0) over the prior's denoiser graph, the loop of `LatentPrior.sample`;
  3. the image decoder graph on z;
  4. greedy captions through the caption decoder's start and step graphs (KV cache in and out),
     with `model/decoding.py`'s repeat block (`repeat_mask`);
  5. alignment: cosine of the image and caption encoders' unit embeddings, the image re-read
     from its uint8 pixels as `generate()` does.
"""

from __future__ import annotations

import argparse
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

META, ARRAYS, TOKENIZER = "inkseed_onnx.json", "inkseed_onnx.npz", "tokenizer.json"
# model/tokenizer.py's fixed special ids (tests/model/test_onnx.py keeps them equal).
PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
SPECIALS = ("[PAD]", "[BOS]", "[EOS]", "[UNK]")
# decode's glue of punctuation, as model/tokenizer.py's.
_SPACE_BEFORE_PUNCT = re.compile(r" ([.,;:!?)])")
_SPACE_AFTER_OPEN = re.compile(r"([(]) ")


@dataclass
class OnnxSamples:
    """What `generate` returns: images uint8 (B, S, S), captions, alignment float32 (B,), z (B, D)."""

    images: np.ndarray
    captions: list[str]
    alignment: np.ndarray
    z: np.ndarray
    seeds: list[int]


# -- the numpy ports of the torch pieces -------------------------------------------------------
def torch_randn(seed: int, n: int) -> np.ndarray:
    """float32 (n,) = torch.randn(n, generator=torch.Generator().manual_seed(seed)) on the CPU.

    torch seeds mt19937 with the seed's low 32 bits (numpy's legacy RandomState does the same),
    takes 24-bit uniforms u from its outputs, and for each block of 16 sets
    x[j] = r cos(2 pi u[j + 8]), x[j + 8] = r sin(2 pi u[j + 8]), r = sqrt(-2 log(1 - u[j])), j < 8;
    a tail of n % 16 redraws 16 fresh uniforms for the last 16 positions. n < 16 takes another
    torch path, which this does not reproduce."""
    if n < 16:
        raise ValueError(f"torch_randn reproduces torch only for n >= 16 numbers, got {n}")
    rng = np.random.RandomState(int(seed) & 0xFFFFFFFF)

    def uniform(k: int) -> np.ndarray:
        bits = rng.randint(0, 2**32, size=k, dtype=np.uint32)
        return (bits & np.uint32((1 << 24) - 1)).astype(np.float32) * np.float32(2.0**-24)

    def box_muller(u: np.ndarray) -> np.ndarray:  # (K, 16) -> (K, 16)
        r = np.sqrt(np.float32(-2.0) * np.log(np.float32(1.0) - u[:, :8]))
        theta = np.float32(2.0 * np.pi) * u[:, 8:]
        return np.concatenate([r * np.cos(theta), r * np.sin(theta)], axis=1)

    u = uniform(n)
    out = u.copy()
    full = n // 16 * 16
    out[:full] = box_muller(u[:full].reshape(-1, 16)).reshape(-1)
    if n % 16:
        out[n - 16 :] = box_muller(uniform(16)[None])[0]
    return out.astype(np.float32)


def ddim_taus(timesteps: int, steps: int) -> list[int]:
    """`torch.linspace(timesteps - 1, 0, steps).round().long()`: float32 linspace as torch's CPU
    kernel computes it (start + step * i for the first half, end - step * (steps - 1 - i) after,
    fused multiply-add), rounded half to even."""
    steps = max(1, min(int(steps), timesteps))
    if steps == 1:
        return [timesteps - 1]
    start, end = np.float32(timesteps - 1), np.float32(0.0)
    step = np.float64((end - start) / np.float32(steps - 1))
    i = np.arange(steps, dtype=np.float64)
    v = np.where(i < steps // 2, np.float64(start) + step * i, np.float64(end) - step * (steps - 1 - i))
    return np.round(v.astype(np.float32)).astype(np.int64).tolist()


def repeat_mask(seqs: np.ndarray, pos: int, vocab: int, n: int, punctuation: np.ndarray | None) -> np.ndarray:
    """model/decoding.py's `repeat_mask` in numpy: (N, V) bool of the tokens that would repeat the
    previous word (looking through punctuation) or complete an n-gram already in seqs[:, :pos]."""
    banned = np.zeros((seqs.shape[0], vocab), dtype=bool)
    if n <= 1 or pos < 2:
        return banned
    rows = np.arange(seqs.shape[0])
    prefix = seqs[:, :pos]  # (N, pos)
    banned[rows, prefix[:, -1]] = True
    if punctuation is not None:
        is_word = ~punctuation[prefix]  # (N, pos)
        last = pos - 1 - is_word[:, ::-1].argmax(1)
        found = is_word.any(1)
        banned[rows[found], prefix[rows[found], last[found]]] = True
    if pos >= n:
        windows = np.lib.stride_tricks.sliding_window_view(prefix, n, axis=1)  # (N, W, n)
        match = (windows[:, :, :-1] == seqs[:, None, pos - n + 1 : pos]).all(-1)  # (N, W)
        r, w = match.nonzero()
        banned[r, windows[r, w, -1]] = True
    banned[:, EOS_ID] = False
    return banned


def to_uint8(images: np.ndarray) -> np.ndarray:
    """model/images.py's conversion: float in [-1, 1] -> uint8, rounded half to even."""
    return np.round((np.clip(images.astype(np.float32), -1, 1) + 1) * np.float32(127.5)).astype(np.uint8)


def to_float(images: np.ndarray) -> np.ndarray:
    """uint8 -> float32 in [-1, 1], as model/images.py's `to_float`."""
    return images.astype(np.float32) / np.float32(127.5) - np.float32(1.0)


# -- the tokenizer -----------------------------------------------------------------------------
class Captions:
    """model/tokenizer.py's encode and decode on the checkpoint's tokenizer.json."""

    def __init__(self, path: Path) -> None:
        self.tok = Tokenizer.from_file(str(path))
        self.tok.encode_special_tokens = True  # specials typed in a caption are text

    def encode(self, texts: list[str], max_len: int) -> np.ndarray:
        out = np.full((len(texts), max_len), PAD_ID, dtype=np.int64)
        for i, enc in enumerate(self.tok.encode_batch(list(texts), add_special_tokens=False)):
            ids = [BOS_ID, *enc.ids[: max_len - 2], EOS_ID]
            out[i, : len(ids)] = ids
        return out

    def decode(self, rows: np.ndarray) -> list[str]:
        texts = []
        for row in rows.tolist():
            words = []
            for i in row:
                if i == EOS_ID:
                    break
                if i not in (PAD_ID, BOS_ID):
                    words.append(self.tok.id_to_token(i) or SPECIALS[UNK_ID])
            texts.append(_SPACE_AFTER_OPEN.sub(r"\1", _SPACE_BEFORE_PUNCT.sub(r"\1", " ".join(words))))
        return texts


# -- the sampler -------------------------------------------------------------------------------
class OnnxSampler:
    """The graphs of an export folder in onnxruntime sessions, and `generate(seeds)`."""

    def __init__(self, folder: str | Path, threads: int = 0) -> None:
        self.dir = Path(folder)
        if not (self.dir / META).is_file():
            raise FileNotFoundError(f"{self.dir / META} is missing: not an inkseed ONNX export folder")
        self.meta = json.loads((self.dir / META).read_text())
        with np.load(self.dir / ARRAYS, allow_pickle=False) as arrays:
            self.arrays = {k: arrays[k] for k in arrays.files}
        self.captions = Captions(self.dir / TOKENIZER)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads  # 0 = onnxruntime's default (the machine's cores)
        self.sessions = {
            name: ort.InferenceSession(str(self.dir / file), opts, providers=["CPUExecutionProvider"])
            for name, file in self.meta["graphs"].items()
        }
        inputs = [i.name for i in self.sessions["image_decoder"].get_inputs()]
        if inputs != ["z"]:  # an export of an older model, whose decoder took more than z
            raise ValueError(f"{self.dir}: its image decoder takes {inputs}, this sampler feeds z alone: "
                             "run the onnx_sampler.py inside that folder")  # fmt: skip

    def _run(self, graph: str, **feeds: np.ndarray) -> list[np.ndarray]:
        return self.sessions[graph].run(None, {k: np.ascontiguousarray(v) for k, v in feeds.items()})

    def noise(self, seeds: list[int]) -> np.ndarray:
        """(B, z_dim) float32: row i is seed i's noise (step 1)."""
        return np.stack([torch_randn(s, self.meta["z_dim"]) for s in seeds])

    def prior_sample(self, noise: np.ndarray, steps: int | None = None, clip: float = 6.0) -> np.ndarray:
        """DDIM (eta = 0) of `LatentPrior.sample`: x_T (B, z_dim) -> z (B, z_dim) (step 2)."""
        ab = self.arrays["alphas_cumprod"]
        taus = ddim_taus(len(ab), steps or self.meta["ddim_steps"])
        x, one = noise.astype(np.float32), np.float32(1.0)
        for i, t in enumerate(taus):
            ab_t, ab_prev = ab[t], ab[taus[i + 1]] if i + 1 < len(taus) else one
            (eps,) = self._run("prior_denoiser", x=x, t=np.full(len(x), t, dtype=np.int64))
            x0 = np.clip((x - np.sqrt(one - ab_t) * eps) / np.sqrt(ab_t), -clip, clip)  # DDIM eq. 12
            x = np.sqrt(ab_prev) * x0 + np.sqrt(one - ab_prev) * eps
        return x * self.arrays["latent_std"] + self.arrays["latent_mean"]

    def decode_image(self, z: np.ndarray) -> np.ndarray:
        """z (B, z_dim) -> images float32 (B, S, S) in [-1, 1] (step 3)."""
        return self._run("image_decoder", z=z)[0]

    def greedy_tokens(self, z: np.ndarray) -> np.ndarray:
        """z (B, z_dim) -> tokens (B, T): `decode_tokens` with temperature 0, beams 1 (step 4)."""
        b, max_len, n = len(z), self.meta["max_caption_tokens"], self.meta["no_repeat_ngram"]
        punctuation = self.arrays["punctuation"]
        tokens = np.full((b, max_len), PAD_ID, dtype=np.int64)
        tokens[:, 0] = BOS_ID
        done = np.zeros(b, dtype=bool)
        logits, *cache = self._run("caption_start", z=z)  # 1. prefill prefix + bos
        for pos in range(1, max_len):
            logits = logits.astype(np.float32)  # 2. pick the next word, as _choose does
            logits[:, [PAD_ID, BOS_ID, UNK_ID]] = -np.inf
            logits[repeat_mask(tokens, pos, logits.shape[-1], n, punctuation)] = -np.inf
            nxt = logits.argmax(-1).astype(np.int64)
            if pos == max_len - 1:
                nxt[:] = EOS_ID  # out of room: close the caption
            tokens[:, pos] = np.where(done, PAD_ID, nxt)
            done |= nxt == EOS_ID
            if done.all():
                break
            past = {f"past_{('key', 'value')[j % 2]}_{j // 2}": c for j, c in enumerate(cache)}  # k0, v0, k1, ...
            logits, *cache = self._run("caption_step", token=nxt, pos=np.array(pos, np.int64), **past)  # 3. a step
        return tokens

    def alignment(self, images: np.ndarray, captions: list[str]) -> np.ndarray:
        """Cosine of the image and caption embeddings (step 5): images uint8 (B, S, S) -> (B,)."""
        e_i = self._run("image_encoder", images=to_float(images))[2]
        tokens = self.captions.encode(captions, self.meta["max_caption_tokens"])
        e_c = self._run("caption_encoder", tokens=tokens)[2]
        return (e_i * e_c).sum(-1).astype(np.float32)

    def generate(self, seeds: list[int], steps: int | None = None, batch_size: int = 64) -> OnnxSamples:
        """seeds -> images uint8 (B, S, S), greedy captions, alignment (B,): `generate()`'s outputs."""
        seeds = [int(s) for s in seeds]
        if not seeds:
            raise ValueError("generate needs at least one seed")
        parts = []
        for start in range(0, len(seeds), batch_size):
            z = self.prior_sample(self.noise(seeds[start : start + batch_size]), steps)  # (B, z_dim)
            images = to_uint8(self.decode_image(z))
            captions = self.captions.decode(self.greedy_tokens(z))
            parts.append((images, captions, self.alignment(images, captions), z))
        images, captions, align, z = zip(*parts)
        flat = [c for chunk in captions for c in chunk]
        return OnnxSamples(np.concatenate(images), flat, np.concatenate(align), np.concatenate(z), seeds)


def main(argv: list[str] | None = None) -> None:
    """`python onnx_sampler.py DIR --seed 0 1 2 [--out FOLDER]`: prints seed, alignment, caption."""
    parser = argparse.ArgumentParser(description="Sample an inkseed ONNX export with onnxruntime.")
    parser.add_argument("folder", help="the export folder (python -m jobs.export --format onnx --out DIR)")
    parser.add_argument("--seed", type=int, nargs="+", required=True, help="seeds to generate")
    parser.add_argument("--steps", type=int, default=None, help="DDIM steps (default: the checkpoint's)")
    parser.add_argument("--out", default=None, help="folder for <seed>.png (needs pillow)")
    args = parser.parse_args(argv)
    samples = OnnxSampler(args.folder).generate(args.seed, args.steps)
    for seed, image, caption, align in zip(samples.seeds, samples.images, samples.captions, samples.alignment):
        print(f"{seed}\t{align:.3f}\t{caption}")
        if args.out:
            from PIL import Image

            Path(args.out).mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(Path(args.out) / f"{seed}.png")


if __name__ == "__main__":
    main()
