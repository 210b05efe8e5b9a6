"""Task04_Hippocampus split into a training dataset (A) and a labelled test set (B): every 4th
listed case (sorted) goes to B. Links only; the shared data is never copied or modified."""
import json
import sys
from pathlib import Path

src, dst = Path(sys.argv[1]).resolve(), Path(sys.argv[2])
meta = json.loads((src / "dataset.json").read_text())
cases = sorted(meta["training"], key=lambda c: c["image"])
cases = [c for c in cases if (src / c["image"]).is_file() and (src / c["label"]).is_file()]
test, train = cases[::4], [c for i, c in enumerate(cases) if i % 4]
for name, sub, items in (("A", ("imagesTr", "labelsTr"), train), ("B", ("imagesTr", "labelsTr"), test)):
    root = dst / name
    for s in sub:
        (root / s).mkdir(parents=True, exist_ok=True)
    for c in items:
        for key, s in zip(("image", "label"), sub):
            f = src / c[key]
            (root / s / f.name).symlink_to(f)
    m = dict(meta, training=[dict(image=f"./{sub[0]}/{Path(c['image']).name}",
                                  label=f"./{sub[1]}/{Path(c['label']).name}") for c in items]
             , numTraining=len(items), test=[])
    (root / "dataset.json").write_text(json.dumps(m, indent=1))
    print(name, len(items))
