"""PCA and whitening (issue 15): do they help retrieval on the trained network's real photos?

Does reducing the trained MobileNetV2's 1280-d embeddings with PCA, with or without whitening, keep (or
improve) which photos come back? Each grocery photo is a query against all the others; a neighbour is
right when it shows the same product (the dataset's fine class: its folder). Reported: precision@10 and
recall@10 of same-product neighbours, and agreement of the top 10 with the unreduced vectors. The PCA is
trained on half the photos (even rows) and every photo is searched, so a whitening that only fits its own
training set shows here.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import faiss
import numpy as np

from common import (
    GROCERY_DIR,
    Report,
    all_photos,
    append_results,
    link_photos,
    log,
    missing_inputs,
    model_spec,
    output_options,
)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--photos", type=int, default=3000)
    p.add_argument("--dims", default="512,256,128,64", help="PCA output dimensions to try")
    output_options(p)
    args = p.parse_args()
    if missing_inputs("mobilenet"):
        print(missing_inputs("mobilenet"))
        return 0
    from neardup.indexer.build import build_index
    from neardup.store import read_catalog

    spec, name = model_spec("mobilenet")
    found = [f for f in all_photos(GROCERY_DIR) if "iconic" not in f.as_posix()]
    picked = found[::max(1, len(found) // args.photos)][:args.photos]
    with tempfile.TemporaryDirectory(prefix="neardup-bench-pca-") as tmp:
        folder = link_photos(picked, Path(tmp) / "photos")
        log(f"embedding {len(picked)} photos with {name}")
        build_index([folder], Path(tmp) / "s.h5", local_features=False, **spec)
        cat = read_catalog(Path(tmp) / "s.h5")
    label_of = {f"{i:05d}{src.suffix}": src.parent.name for i, src in enumerate(picked)}
    labels = np.array([label_of[Path(p).name] for p in cat.paths])
    xb = np.ascontiguousarray(cat.xb, np.float32)
    same = labels[:, None] == labels[None, :]
    np.fill_diagonal(same, False)
    relevant = np.maximum(same.sum(1), 1)

    def neighbours(x: np.ndarray) -> np.ndarray:
        x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        _, I = faiss.knn(x, x, 11, metric=faiss.METRIC_INNER_PRODUCT)
        return np.array([[j for j in row if j != i][:10] for i, row in enumerate(I)])

    base = neighbours(xb)
    rows = []
    report = Report("bench_pca.py", "PCA and whitening on the trained MobileNetV2 (issue 15)",
                    " ".join(__doc__.split("\n\n")[1].split()), params={"photos": len(xb), "model": name,
                                                                        "classes": len(set(labels))})
    for label, d_out, white in [("none (1280-d)", 0, False)] + [
            (f"PCA{'W' if w else ''} {d}", int(d), w) for d in args.dims.split(",") for w in (False, True)]:
        if d_out:
            pca = faiss.PCAMatrix(xb.shape[1], d_out, -0.5 if white else 0.0)
            pca.train(xb[::2])
            x = pca.apply(xb)
        else:
            x = xb
        I = base if not d_out else neighbours(x)
        hits = np.take_along_axis(same, I, axis=1).sum(1)
        agree = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(I, base)])
        rows.append([label, float(hits.mean() / 10), float(np.mean(hits / np.minimum(relevant, 10))), agree])
    report.table("Same-product neighbours (each photo against all others)",
                 ["reduction", "precision@10", "recall@10 (of up to 10)", "top-10 agreement with none"], rows)
    best = max(rows, key=lambda r: r[1])
    report.note(f"best precision@10: {best[0]} ({best[1]:.3f}); unreduced {rows[0][1]:.3f}")
    status = report.finish(args.json)
    if args.record:
        append_results("PCA and whitening on the trained MobileNetV2 (issue 15)", "bench_pca.py", report)
    return status


if __name__ == "__main__":
    sys.exit(main())
