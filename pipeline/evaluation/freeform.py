"""The free-form caption evaluation core: an independent contrastive probe, plus the model-free
sharpness and caption-health measures that go with it.

When a dataset's captions are free text, the attribute probe (probe.py) has no grammar to read, so
the evaluation trains this probe on the train split: a small CNN for images, a bag of words and word
bigrams for captions, matched CLIP-style (symmetric InfoNCE, learnable temperature). It never sees
a generated sample and shares nothing with the generator (its vocabulary comes from the train
captions). Same data and seed, same weights (CPU). The evaluation reads off it coherence
(`retrieval_at_k` of generated pairs against the same on held-out real pairs; chance is 1/k) and
fidelity (the Fréchet distance of `image_features`, taken before the projection).

Pure: numpy in, numbers out, no Ray, no I/O (`to_files` / `from_files` give and take bytes; the
caller caches them). Images are uint8 (N, S, S), ink dark on light paper, as `model.sampling` gives.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Literal, get_args

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors
from torch import nn

from model.tokenizer import canonical_caption
from pipeline.evaluation.probe import random_blur

FORMAT_VERSION = 1
PAD, UNK = "<pad>", "<unk>"
PAD_ID, UNK_ID = 0, 1
Direction = Literal["image_to_caption", "caption_to_image"]
Log = Callable[[str], None]
_WORD = re.compile(r"[^\W_]+")  # runs of letters/digits in any script: "piñata", "t-shirt" -> t, shirt


@dataclass
class ContrastiveProbeConfig:
    """How the probe is built and trained. Every field is part of the cache key."""

    image_size: int = 64  # the side the probe reads: 64 or 128
    # Conv widths of four stages, each halving the side (64 -> 32 -> 16 -> 8 -> 4 px; the first
    # quarters a 128 px image). A full-resolution stem would cost 2.5x the time.
    channels: tuple[int, ...] = (32, 64, 96, 128)
    pool: int = 2  # pooled grid: 2x2 keeps left/right, top/bottom ("at the top left"), a global pool not
    # Width of the features before the projection: the Fréchet space. Kept well below the ~1,000
    # held-out images per set, so the covariance estimate is not rank-starved.
    feature_dim: int = 128
    embed_dim: int = 128  # the shared image-caption space
    word_dim: int = 128
    # Bigrams seen at least this often in the train captions get their own id: a bag of words
    # alone cannot tell "red circle, blue square" from "blue circle, red square".
    min_bigram_count: int = 2
    max_vocab: int = 30_000
    max_words: int = 48  # longer captions are cut (words, before bigrams are added)
    word_dropout: float = 0.1  # share of caption tokens replaced by UNK in training (drop_words)
    # OpenMoji (1,858 train pairs, 64 px, one CPU thread, ~0.2 s a step): 308 steps give held-out
    # retrieval@32 0.25 (chance 0.03) in ~60 s; 210 steps 0.21 in ~40 s, 504 steps 0.29 in ~110 s.
    epochs: int = 10
    min_steps: int = 300  # ... but a small dataset gets more epochs, up to this many steps in all
    batch_size: int = 128  # InfoNCE negatives come from the batch: larger is harder, slower
    lr: float = 2e-3
    weight_decay: float = 1e-4
    temperature: float = 0.07  # initial; learned (as a log logit scale, capped at 100 like CLIP)
    max_train: int = 8_000  # cap on training pairs, which keeps CPU training short
    # Augmentation, so the probe does not key on exact pixels: every image shifted by up to max_shift
    # px, a blur_share of them Gaussian-blurred, sigma uniform in blur_sigma (px at 64 px, scaled with
    # the size). Sharpness is sharpness_ratio's and the Fréchet distance's job, not coherence's.
    max_shift: int = 3
    blur_share: float = 0.3
    blur_sigma: tuple[float, float] = (0.3, 1.2)
    seed: int = 0

    @classmethod
    def from_dict(cls, doc: dict) -> ContrastiveProbeConfig:
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in doc.items()})


# -- words ----------------------------------------------------------------------------------------
def words(text: str) -> list[str]:
    """Lower-cased runs of letters and digits: the probe's and caption_health's word split."""
    return _WORD.findall(text.lower())


def _tokens(text: str, max_words: int) -> list[str]:
    w = words(text)[:max_words]
    return w + [f"{a} {b}" for a, b in zip(w, w[1:])]  # a bigram has a space: never a word


def build_vocab(captions: Sequence[str], cfg: ContrastiveProbeConfig) -> dict[str, int]:
    """Every train word, the bigrams seen at least cfg.min_bigram_count times; most frequent
    first (ties alphabetical, so the ids do not depend on the order of the captions)."""
    counts = Counter(t for c in captions for t in _tokens(c, cfg.max_words))
    keep = [t for t, n in counts.items() if " " not in t or n >= cfg.min_bigram_count]
    keep = sorted(keep, key=lambda t: (-counts[t], t))[: cfg.max_vocab - 2]
    return {PAD: PAD_ID, UNK: UNK_ID, **{t: i + 2 for i, t in enumerate(keep)}}


def encode(captions: Sequence[str], vocab: dict[str, int], max_words: int) -> torch.Tensor:
    """Token ids (N, L), PAD_ID-padded. An unknown word is UNK_ID; an unknown bigram is dropped
    (its words still count); an empty caption is one UNK_ID."""
    rows = [[vocab.get(t, UNK_ID) for t in _tokens(c, max_words) if " " not in t or t in vocab] or [UNK_ID]
            for c in captions]  # fmt: skip
    out = torch.full((len(rows), max(map(len, rows), default=1)), PAD_ID, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r)
    return out


def _bag_keys(ids: torch.Tensor) -> np.ndarray:
    """(N,) ints, equal exactly when two rows of ids (N, L) hold the same multiset of ids: the
    mean pool cannot tell them apart, so they get the same caption embedding."""
    return np.unique(torch.sort(ids, dim=1).values.numpy(), axis=0, return_inverse=True)[1].reshape(-1)


# -- the network ----------------------------------------------------------------------------------
class ContrastiveProbe(nn.Module):
    """uint8 images (B, S, S) and captions -> L2-normalised embeddings (B, E) in one space."""

    def __init__(self, cfg: ContrastiveProbeConfig, vocab: dict[str, int]) -> None:
        super().__init__()
        self.config, self.vocab = cfg, dict(vocab)
        self.info: dict[str, float] = {}  # how it was trained (seconds, steps, size); saved along
        # The stem's kernel is wider than its stride (2, or 4 at 128 px): no 1 px line falls between.
        st, c = 2 * max(1, cfg.image_size // 64), cfg.channels[0]
        layers: list[nn.Module] = [nn.Conv2d(1, c, st + 1, stride=st, padding=st // 2), _norm(c), nn.SiLU()]
        for c_next in cfg.channels[1:]:
            layers += [nn.Conv2d(c, c_next, 3, stride=2, padding=1), _norm(c_next), nn.SiLU()]
            c = c_next
        self.trunk = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(cfg.pool), nn.Flatten())  # (B, C p^2)
        self.features = nn.Sequential(nn.Linear(c * cfg.pool**2, cfg.feature_dim), nn.SiLU())
        self.image_proj = nn.Linear(cfg.feature_dim, cfg.embed_dim)
        w = cfg.word_dim
        self.word_embed = nn.Embedding(len(self.vocab), w, padding_idx=PAD_ID)
        self.caption_mlp = nn.Sequential(nn.LayerNorm(w), nn.Linear(w, 2 * w), nn.SiLU(), nn.Linear(2 * w, cfg.embed_dim))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / cfg.temperature)))

    # Tensor side, used in training: x is ink in [0, 1] (B, S, S), paper 0 (= the conv padding).
    def encode_images(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (features (B, F), normalised embeddings (B, E))."""
        h = self.features(self.trunk(x[:, None]))
        return h, F.normalize(self.image_proj(h), dim=-1)

    def encode_captions(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (B, L) -> normalised embeddings (B, E) of the mean token vector."""
        mask = ids != PAD_ID  # (B, L)
        e = self.word_embed(ids) * mask[..., None]  # (B, L, W)
        pooled = e.sum(1) / mask.sum(1, keepdim=True).clamp(min=1)  # (B, W)
        return F.normalize(self.caption_mlp(pooled), dim=-1)

    # numpy side, used by the evaluation: float32 (N, .) in batches of batch_size.
    @torch.inference_mode()
    def _images(self, images: np.ndarray, batch_size: int, which: Literal[0, 1]) -> np.ndarray:
        _check_images(images, self.config.image_size)
        self.eval()
        dev, batches = self.logit_scale.device, range(0, len(images), batch_size)
        x = (_ink(torch.from_numpy(np.ascontiguousarray(images[i : i + batch_size])).to(dev)) for i in batches)
        return np.concatenate([self.encode_images(b)[which].float().cpu().numpy() for b in x])

    def image_features(self, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """uint8 (N, S, S) -> features before the projection (N, F) float32: the Fréchet space."""
        return self._images(images, batch_size, 0)

    def image_embed(self, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """uint8 (N, S, S) -> L2-normalised embeddings (N, E) float32."""
        return self._images(images, batch_size, 1)

    @torch.inference_mode()
    def caption_embed(self, captions: Sequence[str], batch_size: int = 1024) -> np.ndarray:
        """captions (N,) -> L2-normalised embeddings (N, E) float32."""
        self.eval()
        out = [np.zeros((0, self.config.embed_dim), np.float32)]
        for i in range(0, len(captions), batch_size):
            ids = encode(captions[i : i + batch_size], self.vocab, self.config.max_words)
            out.append(self.encode_captions(ids.to(self.logit_scale.device)).float().cpu().numpy())
        return np.concatenate(out)

    # Files: safetensors weights + JSON description; nothing is ever unpickled.
    def to_files(self) -> dict[str, bytes]:
        weights = save_tensors({k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()})
        doc = {"format_version": FORMAT_VERSION, "config": asdict(self.config), "vocab": self.vocab,
               "info": self.info, "weights_sha256": hashlib.sha256(weights).hexdigest()}  # fmt: skip
        return {"probe.safetensors": weights, "probe.json": json.dumps(doc, indent=1).encode()}

    @classmethod
    def from_files(cls, files: dict[str, bytes]) -> ContrastiveProbe:
        """The probe of `to_files`; ValueError if the files do not belong together or are damaged."""
        doc, weights = json.loads(files["probe.json"]), files["probe.safetensors"]
        if doc.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"contrastive probe format {doc.get('format_version')}, expected {FORMAT_VERSION}")
        if hashlib.sha256(weights).hexdigest() != doc.get("weights_sha256"):
            raise ValueError("contrastive probe weights do not match their description (sha256)")
        probe = cls(ContrastiveProbeConfig.from_dict(doc["config"]), doc["vocab"])
        probe.load_state_dict(load_tensors(weights))
        probe.info = dict(doc.get("info", {}))
        return probe.eval()


def _norm(c: int) -> nn.GroupNorm:
    # GroupNorm, not BatchNorm: a sample's features do not depend on its batch (eval = train).
    return nn.GroupNorm(min(8, c // 4), c)


def _ink(u8: torch.Tensor) -> torch.Tensor:
    return 1.0 - u8.float() / 255.0  # (B, S, S): ink 1, paper 0


def _check_images(images: np.ndarray, size: int) -> None:
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (size, size) or not len(images):
        raise ValueError(f"probe expects uint8 images (N>0, {size}, {size}), got {images.dtype} {images.shape}")


# -- training -------------------------------------------------------------------------------------
def augment(x: torch.Tensor, cfg: ContrastiveProbeConfig, gen: torch.Generator) -> torch.Tensor:
    """Shift every image of x (B, S, S) ink by up to cfg.max_shift px (paper comes in), then blur
    a cfg.blur_share of them, each by its own sigma."""
    b, size, scale = x.shape[0], x.shape[-1], cfg.image_size / 64
    if r := round(cfg.max_shift * scale):
        padded = F.pad(x, (r, r, r, r))  # (B, S+2r, S+2r), zero = paper
        dx, dy = torch.randint(0, 2 * r + 1, (2, b), generator=gen).tolist()
        x = torch.stack([padded[i, y : y + size, u : u + size] for i, (u, y) in enumerate(zip(dx, dy))])
    return random_blur(x, cfg.blur_share, cfg.blur_sigma, scale, gen, pad="constant")  # zero = paper in ink space


def drop_words(ids: torch.Tensor, p: float, gen: torch.Generator) -> torch.Tensor:
    """ids (B, L) with a share p of the tokens replaced by UNK_ID: no single word becomes the key,
    and UNK, which the train captions never contain, learns to mean "no information"."""
    drop = (torch.rand(ids.shape, generator=gen) < p) & (ids != PAD_ID)
    return torch.where(drop, torch.full_like(ids, UNK_ID), ids)


def info_nce(img: torch.Tensor, cap: torch.Tensor, scale: torch.Tensor, same: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE of normalised img, cap (B, E). same (B, B) marks pairs whose captions are
    identical bags: all of them are positives (shared evenly), not false negatives."""
    logits = scale * img @ cap.T  # (B, B)
    target = same.float() / same.float().sum(1, keepdim=True)  # (B, B), rows sum to 1; symmetric
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


def _optimizer(probe: ContrastiveProbe, cfg: ContrastiveProbeConfig, total_steps: int) -> tuple:
    # No weight decay on the norms, biases and the logit scale: decay would pull the temperature to 1.
    groups = [{"params": [p for p in probe.parameters() if p.ndim >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in probe.parameters() if p.ndim < 2], "weight_decay": 0.0}]  # fmt: skip
    opt = torch.optim.AdamW(groups, lr=cfg.lr)
    return opt, torch.optim.lr_scheduler.OneCycleLR(opt, cfg.lr, total_steps=total_steps)


def train_contrastive_probe(
    images: np.ndarray, captions: Sequence[str], cfg: ContrastiveProbeConfig, log: Log = print, device: str = "cpu"
) -> ContrastiveProbe:
    """Train on (image, caption) pairs of a train split (at most cfg.max_train of them).

    One torch.Generator seeded by cfg.seed drives init, subsampling, shuffling and augmentation
    (all on CPU), so the same data and config give the same weights on CPU."""
    _check_images(images, cfg.image_size)
    if len(images) != len(captions) or len(images) < 16:
        raise ValueError(f"need >= 16 image-caption pairs of equal count, got {len(images)} and {len(captions)}")
    gen = torch.Generator().manual_seed(cfg.seed)
    idx = torch.arange(len(images))
    if len(images) > cfg.max_train:
        idx = torch.randperm(len(images), generator=gen)[: cfg.max_train].sort().values
    x_all = torch.from_numpy(np.ascontiguousarray(images[idx.numpy()]))  # (N, S, S) uint8
    caps = [captions[i] for i in idx.tolist()]
    vocab = build_vocab(caps, cfg)
    ids_all = encode(caps, vocab, cfg.max_words)  # (N, L)
    bag = torch.from_numpy(_bag_keys(ids_all))  # (N,): same bag of tokens, same caption for the loss
    with torch.random.fork_rng(devices=[]):  # seed the init without touching the caller's RNG
        torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=gen)))
        probe = ContrastiveProbe(cfg, vocab).to(device).train()
    batch = min(cfg.batch_size, len(caps))
    per_epoch = len(caps) // batch  # drop the ragged last batch: every step as many negatives
    epochs = max(cfg.epochs, math.ceil(cfg.min_steps / per_epoch))
    opt, sched = _optimizer(probe, cfg, epochs * per_epoch)
    start = time.perf_counter()
    for epoch in range(epochs):
        order, total = torch.randperm(len(caps), generator=gen), 0.0
        for step in range(per_epoch):
            b = order[step * batch : (step + 1) * batch]
            x = augment(_ink(x_all[b]), cfg, gen).to(device)
            ids = drop_words(ids_all[b], cfg.word_dropout, gen).to(device)
            img, cap = probe.encode_images(x)[1], probe.encode_captions(ids)
            loss = info_nce(img, cap, probe.logit_scale.exp(), (bag[b, None] == bag[None, b]).to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            with torch.no_grad():
                probe.logit_scale.clamp_(max=math.log(100.0))
            total += float(loss.detach())
        if (epoch + 1) % max(1, epochs // 5) == 0 or epoch + 1 == epochs:
            log(f"contrastive probe epoch {epoch + 1}/{epochs}: loss {total / per_epoch:.4f}")
    seconds, steps = time.perf_counter() - start, epochs * per_epoch
    probe.info = {"train_seconds": seconds, "train_size": len(caps), "epochs": epochs, "steps": steps,
                  "final_loss": total / per_epoch, "vocab_size": len(vocab),
                  "logit_scale": float(probe.logit_scale.detach().exp())}  # fmt: skip
    log(f"contrastive probe: {len(caps)} pairs, vocab {len(vocab)}, {steps} steps in {seconds:.1f}s")
    return probe.eval()


# -- coherence ------------------------------------------------------------------------------------
def retrieval_at_k(
    probe: ContrastiveProbe, images: np.ndarray, captions: Sequence[str], k: int = 32, seed: int = 0,
    direction: Direction = "image_to_caption",
) -> float:  # fmt: skip
    """Share of pairs i whose own partner the probe ranks first among k candidates: its own plus
    k-1 others drawn (seeded, without replacement) from the other pairs of the set; chance is 1/k.
    "image_to_caption": image i picks among captions; "caption_to_image": caption i among images.
    Ties are misses, as is a rival the probe cannot tell apart (same image bytes / bag of tokens)."""
    n = len(images)
    if direction not in get_args(Direction):
        raise ValueError(f"direction must be one of {get_args(Direction)}, got {direction!r}")
    if n != len(captions) or not 2 <= k <= n:
        raise ValueError(f"retrieval@{k} needs >= {k} pairs of equal count, got {n} and {len(captions)}")
    img, cap = probe.image_embed(images), probe.caption_embed(captions)  # (N, E) each
    if direction == "image_to_caption":
        query, cand, keys = img, cap, _bag_keys(encode(captions, probe.vocab, probe.config.max_words))
    else:
        query, cand = cap, img
        keys = np.unique([hashlib.sha256(im.tobytes()).digest() for im in images], return_inverse=True)[1]
    rng = np.random.default_rng(seed)
    others = np.stack([rng.choice(n - 1, k - 1, replace=False) for _ in range(n)])  # (N, k-1)
    others += others >= np.arange(n)[:, None]  # skip i itself
    own = np.einsum("ne,ne->n", query, cand)  # (N,)
    rival = np.einsum("ne,nke->nk", query, cand[others])  # (N, k-1)
    keys = keys.reshape(-1)
    clash = (keys[others] == keys[:, None]).any(1)  # (N,)
    return float(np.mean((own > rival.max(1)) & ~clash))


# -- sharpness ------------------------------------------------------------------------------------
def mean_gradient(images: np.ndarray) -> float:
    """Mean absolute finite difference along x and along y (averaged) of images (N, S, S) on
    [0, 1] (uint8 are divided by 255). Blur lowers it; so does less ink, so compare like with like."""
    x = images.astype(np.float64) / 255.0 if images.dtype == np.uint8 else images.astype(np.float64)
    if x.ndim != 3 or x.shape[1] < 2 or x.shape[2] < 2 or not len(x):
        raise ValueError(f"mean_gradient expects images (N, H, W) with H, W >= 2, got {images.shape}")
    return float(0.5 * (np.abs(np.diff(x, axis=2)).mean() + np.abs(np.diff(x, axis=1)).mean()))


def sharpness_ratio(generated: np.ndarray, real: np.ndarray) -> float:
    """mean_gradient(generated) / mean_gradient(real): ~1 at the real crispness, < 1 when soft."""
    return mean_gradient(generated) / max(mean_gradient(real), 1e-12)


# -- caption health -------------------------------------------------------------------------------
def repeats(text: str) -> bool:
    """A word immediately repeated ("mime mime") or a word bigram occurring twice."""
    w = words(text)
    bigrams = list(zip(w, w[1:]))
    return any(a == b for a, b in bigrams) or len(set(bigrams)) < len(bigrams)


def caption_health(captions: Sequence[str], train_captions: Sequence[str]) -> dict[str, float]:
    """repeated_ngram_share (`repeats`), distinct_share (distinct / N), novel_share (not verbatim a
    train caption; both up to case and spacing: canonical_caption), vocab_known_share (generated
    words, with repeats, that occur in the train captions; 0 if none), mean_words."""
    if not captions:
        raise ValueError("caption_health needs at least one caption")
    seen = {canonical_caption(c) for c in train_captions}
    mine = [canonical_caption(c) for c in captions]
    known = {w for c in train_captions for w in words(c)}
    generated = [w for c in captions for w in words(c)]
    return {
        "repeated_ngram_share": float(np.mean([repeats(c) for c in captions])),
        "distinct_share": len(set(mine)) / len(mine),
        "novel_share": float(np.mean([c not in seen for c in mine])),
        "vocab_known_share": float(np.mean([w in known for w in generated])) if generated else 0.0,
        "mean_words": len(generated) / len(captions),
    }
