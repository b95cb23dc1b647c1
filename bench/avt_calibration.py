"""AVT-Digits calibration: how informative is each modality on the test split, and how much does fusing help?

    .venv/bin/python bench/avt_calibration.py [--data data/avt_digits] [--neural]
        [--out bench/results/avt_calibration.json]

Quick per-modality classifiers trained on train, scored on test (no Ray, no mmfusion model code, so the
dataset can be judged on its own):
    linear   logistic regression on pixels, on character n-grams (tf-idf), on time-warped log-mel frames;
             "fused" = one logistic regression on the three feature sets concatenated (a missing modality's
             block is zeros), "late" = the sum of the single-modality log-probabilities over the modalities
             present
    neural   (--neural) a small CNN on pixels, a byte-level BiLSTM on text, a CNN on 1 s of log-mel: roughly
             the default encoders of jobs/configs/avt_digits.yaml, trained 8 epochs; "late" sums their
             log-probabilities; "fused" = the three encoders trained jointly under a concat + MLP head with
             modality dropout 0.2
The dataset wants every single modality informative but imperfect on test (roughly 60-85%) and fusion well
ahead of the best single modality. Prints a Markdown table and writes JSON.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import soundfile as sf
from PIL import Image

log = logging.getLogger("bench.avt_calibration")
MODS = ("image", "text", "audio")


def _read(data: Path, split: str) -> dict[str, list]:
    path = data / f"{split}.parquet"
    table = pq.read_table(path if path.exists() else data / split)
    return table.to_pydict()


def _images(values: list) -> np.ndarray:  # -> (N, 28, 28) float32 in [0, 1], zeros where missing
    out = np.zeros((len(values), 28, 28), np.float32)
    for i, v in enumerate(values):
        if v is not None:
            out[i] = np.asarray(Image.open(io.BytesIO(v)), np.float32) / 255.0
    return out


def _logmel(values: list, warp_frames: int | None) -> np.ndarray:
    """-> (N, 40, warp_frames) per-utterance-normalized log-mel warped to a fixed length (linear features), or
    (N, 40, 101): the first second, padded (CNN features). Zeros where missing."""
    import torch
    import torchaudio

    mel = torchaudio.transforms.MelSpectrogram(8000, n_fft=256, hop_length=80, n_mels=40)
    frames = warp_frames or 101
    out = np.zeros((len(values), 40, frames), np.float32)
    for i, v in enumerate(values):
        if v is None:
            continue
        wav, _ = sf.read(io.BytesIO(v), dtype="float32")
        x = torch.from_numpy(wav)
        if warp_frames:
            m = torch.log(mel(x) + 1e-6)
            m = m - m.mean(1, keepdim=True)
            out[i] = torch.nn.functional.interpolate(m[None], size=warp_frames, mode="linear")[0].numpy()
        else:
            x = torch.nn.functional.pad(x[:8000], (0, max(0, 8000 - len(x))))
            out[i] = torch.log(mel(x) + 1e-6).numpy()
    return out


def _linear(tr: dict, te: dict) -> dict[str, float]:
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    ytr, yte = np.array(tr["label"]), np.array(te["label"])
    present = {s: {m: np.array([v is not None for v in d[m]]) for m in MODS}
               for s, d in (("tr", tr), ("te", te))}
    vec = TfidfVectorizer(analyzer="char_wb", ngram_range=(1, 3), sublinear_tf=True)
    vec.fit([t for t in tr["text"] if t is not None])
    feats = {
        "image": (_images(tr["image"]).reshape(len(ytr), -1), _images(te["image"]).reshape(len(yte), -1)),
        "text": (vec.transform([t or "" for t in tr["text"]]).toarray(),
                 vec.transform([t or "" for t in te["text"]]).toarray()),
        "audio": (_logmel(tr["audio"], 20).reshape(len(ytr), -1),
                  _logmel(te["audio"], 20).reshape(len(yte), -1)),
    }
    acc, logp, blocks = {}, {}, ([], [])
    for m in MODS:
        a, b = feats[m]
        sc = StandardScaler().fit(a[present["tr"][m]])
        a = sc.transform(a) * present["tr"][m][:, None]
        b = sc.transform(b) * present["te"][m][:, None]
        clf = LogisticRegression(max_iter=2000, C=0.05 if m != "text" else 1.0)
        clf.fit(a[present["tr"][m]], ytr[present["tr"][m]])
        p = clf.predict_log_proba(b)
        logp[m] = np.where(present["te"][m][:, None], p, 0.0)
        acc[m] = float(np.mean(p.argmax(1)[present["te"][m]] == yte[present["te"][m]]))
        blocks[0].append(a)
        blocks[1].append(b)
        log.info("linear %s: test accuracy %.3f", m, acc[m])
    clf = LogisticRegression(max_iter=3000, C=0.05).fit(np.hstack(blocks[0]), ytr)
    acc["fused"] = float(np.mean(clf.predict(np.hstack(blocks[1])) == yte))
    acc["late"] = float(np.mean(sum(logp.values()).argmax(1) == yte))
    return acc


def _neural(tr: dict, te: dict, epochs: int = 8, seed: int = 0) -> dict[str, float]:
    import torch
    from torch import nn

    torch.manual_seed(seed)
    ytr, yte = torch.tensor(tr["label"]), torch.tensor(te["label"])

    def text_ids(values: list) -> torch.Tensor:  # UTF-8 bytes + 3, padded with 0: like the builtin tokenizer
        ids = torch.zeros(len(values), 32, dtype=torch.long)
        for i, v in enumerate(values):
            b = list((v or "").lower().encode())[:32]
            ids[i, : len(b)] = torch.tensor(b, dtype=torch.long) + 3
        return ids

    class BiLSTM(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb, self.lstm = nn.Embedding(259, 64, padding_idx=0), nn.LSTM(64, 96, batch_first=True,
                                                                                  bidirectional=True)
            self.out = nn.Linear(192, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, L) -> (B, 10)
            h, _ = self.lstm(self.emb(x))
            m = (x > 0).unsqueeze(-1).float()
            return self.out((h * m).sum(1) / m.sum(1).clamp(min=1))

    def cnn(in_hw_pool: tuple[int, int]) -> nn.Module:
        return nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                             nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.AdaptiveMaxPool2d(in_hw_pool),
                             nn.Flatten(), nn.Linear(64 * in_hw_pool[0] * in_hw_pool[1], 128), nn.ReLU(),
                             nn.Dropout(0.2), nn.Linear(128, 10))

    au_tr, au_te = _logmel(tr["audio"], None), _logmel(te["audio"], None)
    mu, sd = au_tr.mean(), au_tr.std()
    data = {
        "image": ((torch.from_numpy(_images(tr["image"]))[:, None] - 0.1307) / 0.3081,
                  (torch.from_numpy(_images(te["image"]))[:, None] - 0.1307) / 0.3081, lambda: cnn((7, 7))),
        "text": (text_ids(tr["text"]), text_ids(te["text"]), BiLSTM),
        "audio": (torch.from_numpy((au_tr - mu) / sd)[:, None], torch.from_numpy((au_te - mu) / sd)[:, None],
                  lambda: cnn((5, 12))),
    }
    acc, logp = {}, {}
    for m in MODS:
        xtr, xte, make = data[m]
        ptr = torch.tensor([v is not None for v in tr[m]])
        pte = torch.tensor([v is not None for v in te[m]])
        xtr_m, ytr_m = xtr[ptr], ytr[ptr]
        net = make()
        opt = torch.optim.AdamW(net.parameters(), 2e-3, weight_decay=1e-4)
        for _ in range(epochs):
            net.train()
            for idx in torch.randperm(len(ytr_m)).split(64):
                loss = nn.functional.cross_entropy(net(xtr_m[idx]), ytr_m[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
        net.eval()
        with torch.no_grad():
            lp = torch.log_softmax(net(xte), -1)
        acc[m] = float((lp.argmax(1)[pte] == yte[pte]).float().mean())
        logp[m] = torch.where(pte[:, None], lp, torch.zeros_like(lp))
        log.info("neural %s: test accuracy %.3f", m, acc[m])
    acc["late"] = float((sum(logp.values()).argmax(1) == yte).float().mean())
    acc["fused"] = _joint(data, tr, te, trunks={"image": lambda: cnn((7, 7))[:-1], "text": BiLSTM,
                                                 "audio": lambda: cnn((5, 12))[:-1]}, epochs=epochs)
    log.info("neural joint fusion: test accuracy %.3f", acc["fused"])
    return acc


def _joint(data: dict, tr: dict, te: dict, trunks: dict, epochs: int, drop: float = 0.2) -> float:
    """One model over all modalities, trained end to end: per-modality encoders -> concat (a learned
    placeholder for a missing or dropped modality) -> MLP; each modality hidden from a training row with
    probability `drop`."""
    import torch
    from torch import nn

    class Joint(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.enc = nn.ModuleDict({m: trunks[m]() for m in MODS})
            self.enc["text"].out = nn.Linear(192, 128)  # the BiLSTM's head becomes a 128-d projection
            self.placeholder = nn.Parameter(torch.zeros(len(MODS), 128))
            self.head = nn.Sequential(nn.Linear(3 * 128, 256), nn.ReLU(), nn.Dropout(0.2), nn.Linear(256, 10))

        def forward(self, xs: list[torch.Tensor], present: torch.Tensor) -> torch.Tensor:  # present: (B, 3)
            feats = [torch.where(present[:, i:i + 1], self.enc[m](xs[i]), self.placeholder[i])
                     for i, m in enumerate(MODS)]
            return self.head(torch.cat(feats, dim=1))

    ytr, yte = torch.tensor(tr["label"]), torch.tensor(te["label"])
    ptr = torch.tensor([[v is not None for v in tr[m]] for m in MODS]).T  # (N, 3)
    pte = torch.tensor([[v is not None for v in te[m]] for m in MODS]).T
    net = Joint()
    opt = torch.optim.AdamW(net.parameters(), 2e-3, weight_decay=1e-4)
    for _ in range(epochs):
        net.train()
        for idx in torch.randperm(len(ytr)).split(64):
            keep = ptr[idx] & (torch.rand(len(idx), len(MODS)) >= drop)
            keep[keep.sum(1) == 0] = ptr[idx][keep.sum(1) == 0]  # never hide every modality of a row
            loss = nn.functional.cross_entropy(net([data[m][0][idx] for m in MODS], keep), ytr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.eval()
    with torch.no_grad():
        return float((net([data[m][1] for m in MODS], pte).argmax(1) == yte).float().mean())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="data/avt_digits")
    p.add_argument("--neural", action="store_true", help="also train small neural encoders (a few minutes)")
    p.add_argument("--out", default="bench/results/avt_calibration.json")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    data = Path(args.data)
    t0 = time.perf_counter()
    tr, te = _read(data, "train"), _read(data, "test")
    results = {"linear": _linear(tr, te)}
    if args.neural:
        results["neural"] = _neural(tr, te)
    cols = ["image", "text", "audio", "fused", "late"]
    lines = ["| classifier | " + " | ".join(cols) + " | fused - best single | late - best single |",
             "|---" * (len(cols) + 3) + "|"]
    for name, acc in results.items():
        best = max(acc[m] for m in MODS)
        lines.append(f"| {name} | " + " | ".join(f"{acc[c]:.3f}" for c in cols)
                     + f" | {100 * (acc['fused'] - best):+.1f} | {100 * (acc['late'] - best):+.1f} |")
    sys.stdout.write("\n".join(lines) + "\n")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    card = json.loads((data / "data_card.json").read_text())
    out.write_text(json.dumps({"data": str(data), "variant": card.get("variant"), "seed": card.get("seed"),
                               "test_accuracy": results, "seconds": round(time.perf_counter() - t0, 1)},
                              indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
