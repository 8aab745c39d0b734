"""The outputs of ``reneg eval`` besides the images: summary.json, plots, report.html, report.md.

Everything here works from the score rows (the rows of ``scores.csv``), not from the models. The HTML uses relative paths only (``images/...``, ``plots/...``)
and opens from disk in any browser, without a server.
"""

from __future__ import annotations

import html
import math
import os
import time
from collections import OrderedDict

from reneg.fileio import atomic_path, atomic_write_json, atomic_write_text

from . import stats
from .provenance import UNKNOWN, reward_names_of, role_text

PLOT_DIR = "plots"
PLOTS = ("means.png", "categories.png", "differences.png", "winrates.png")


# --------------------------------------------------------------------------- summary


def _table(rows, reward):
    """{negative: {(index, seed): score}} for one reward."""
    out: dict[str, dict] = {}
    for r in rows:
        if r["reward"] == reward:
            out.setdefault(r["negative"], {})[(r["prompt_index"], r["seed"])] = float(r["score"])
    return out


def pick_reference(names: list[str], requested: str | None = None) -> str:
    if requested:
        return requested
    for cand in ("handcrafted", "null"):
        if cand in names:
            return cand
    return names[0]


def build_summary(
    rows,
    items,
    negatives,
    reward_names,
    cfg,
    tuning=None,
    timing=None,
    coverage=None,
    diversity=None,
    reward_roles=None,
) -> dict:
    """Means, paired differences and win rates. ``coverage`` ({negative: its items}) names negatives made
    for a subset of the items (``--tune-per-prompt``); a pair of negatives is compared on the images both
    have, and ``subsets`` gives every negative's mean on each such subset. ``diversity``: ``{"reward",
    "rows" (those of diversity.csv), "note"}``, summarised per negative with its paired difference from
    the reference (paired on prompt); ``reward_roles``: :func:`.provenance.reward_roles`."""
    neg_names = [n.name for n in negatives]
    keys = [(it.index, it.seed) for it in items]
    cover = {
        n: ([(it.index, it.seed) for it in coverage[n]] if coverage and n in coverage else keys) for n in neg_names
    }
    cats = list(OrderedDict.fromkeys(it.category for it in items))
    cat_of = {(it.index, it.seed): it.category for it in items}
    by_cat = {c: [(it.index, it.seed) for it in items if it.category == c] for c in cats}
    ref = pick_reference(neg_names, getattr(cfg, "reference", None))
    tie_tol = getattr(cfg, "tie_tol", 0.0)
    partial = [n for n in neg_names if len(cover[n]) != len(keys)]

    def common(a, b):
        kb = set(cover[b])
        return [k for k in cover[a] if k in kb]

    means, wins, diffs, subsets = {}, {}, {}, {}
    for rw in reward_names:
        tab = _table(rows, rw)
        for n in neg_names:
            miss = [k for k in cover[n] if k not in tab.get(n, {})]
            if miss:
                raise ValueError(
                    f"scores for reward {rw}, negative {n}: {len(miss)} image(s) have no score "
                    f"(e.g. prompt {miss[0][0]} seed {miss[0][1]})"
                )
        means[rw] = {
            n: {
                "all": stats.mean_ci([tab[n][k] for k in cover[n]]),
                "categories": {c: stats.mean_ci([tab[n][k] for k in cover[n] if cat_of[k] == c]) for c in cats},
            }
            for n in neg_names
        }
        wins[rw] = {
            a: {
                b: stats.win_rate([tab[a][k] for k in common(a, b)], [tab[b][k] for k in common(a, b)], tie_tol)
                for b in neg_names
                if b != a
            }
            for a in neg_names
        }
        diffs[rw] = {
            a: {
                b: stats.mean_ci(
                    stats.paired_differences([tab[a][k] for k in common(a, b)], [tab[b][k] for k in common(a, b)])
                )
                for b in neg_names
                if b != a
            }
            for a in neg_names
        }
        subsets[rw] = {p: {n: stats.mean_ci([tab[n][k] for k in cover[p]]) for n in neg_names} for p in partial}
    tune_summary = {}
    for name, logs in (tuning or {}).items():
        vals = [v for v in logs.values() if v.get("best_reward") is not None and v.get("start_reward") is not None]
        if vals:
            tune_summary[name] = {
                "tuned_images": len(vals),
                "mean_start_reward": sum(v["start_reward"] for v in vals) / len(vals),
                "mean_best_reward": sum(v["best_reward"] for v in vals) / len(vals),
                "improved": sum(1 for v in vals if v["best_step"] > 0),
                "mean_steps": sum(v["steps"] for v in vals) / len(vals),
                "note": "rewards measured on the float image during the search (tuning reward: the first --reward)",
            }
    settings = cfg.to_json() if hasattr(cfg, "to_json") else dict(cfg)
    div_top, div_per = _diversity_summary(diversity, neg_names, ref, cover)
    roles = {r["name"]: r for r in (reward_roles or [])}
    return {
        "title": getattr(cfg, "title", "ReNeg evaluation"),
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
        "images_per_negative": len(keys),
        "prompts": len({it.index for it in items}),
        "rewards": [
            roles.get(rw) or {"name": rw, "spec": None, "role": UNKNOWN, "trained_by": [], "embeddings": {}}
            for rw in reward_names
        ],
        "negatives": [
            {
                "name": n.name,
                "kind": n.kind,
                "source": n.source,
                "description": n.describe(),
                "diversity": div_per[n.name],
            }
            for n in negatives
        ],
        "reference": ref,
        "diversity": div_top,
        "categories": {c: len(v) for c, v in by_cat.items()},
        "images": {n: len(cover[n]) for n in neg_names},
        "subsets": subsets,
        "interval_method": stats.INTERVAL_METHOD,
        "tie_tolerance": tie_tol,
        "means": means,
        "win_rates": wins,
        "differences": diffs,
        "tuning": tune_summary,
        "timing": timing or {},
        "settings": settings,
    }


DIVERSITY_NEEDS = "diversity needs --images-per-prompt 2 or more"
DIVERSITY_MEASURE = (
    "mean pairwise 1 - cosine of the reward's image features between the images of one prompt (across seeds), "
    "averaged over prompts with a 95% Student-t interval; identical images score 0; a drop against the "
    "reference is the sign of reward hacking: the images of a prompt converge"
)


def _diversity_summary(div, neg_names, ref, cover) -> tuple[dict, dict]:
    """(``summary["diversity"]``, ``{negative: its "diversity" entry}``) from per-prompt diversity rows."""
    div = div or {"reward": None, "rows": [], "note": "diversity was not measured"}
    rw, note = div.get("reward"), div.get("note")
    top = {"reward": rw, "measure": DIVERSITY_MEASURE, "csv": "diversity.csv", "note": note}
    if div.get("frames", 1) > 1:
        top["video"] = "a video's feature is the mean of its frames' features"
    by: dict[str, dict[int, float]] = {n: {} for n in neg_names}
    for r in div.get("rows") or []:
        if r["negative"] in by:
            by[r["negative"]][int(r["prompt_index"])] = float(r["diversity"])
    per = {}
    for n in neg_names:
        entry = {"reward": rw, "mean": None, "difference_vs_reference": None, "reference": ref, "note": note}
        if note is None and not by[n]:
            per_prompt = len(cover[n]) / max(1, len({k[0] for k in cover[n]}))
            entry["note"] = f"diversity needs 2 or more images per prompt; {n} has {per_prompt:g} (--tune-per-prompt)"
        if by[n]:
            entry["mean"] = stats.mean_ci(list(by[n].values()))
            entry["prompts"] = len(by[n])
            if n != ref and by.get(ref):
                common = [p for p in by[n] if p in by[ref]]
                entry["difference_vs_reference"] = stats.mean_ci(
                    stats.paired_differences([by[n][p] for p in common], [by[ref][p] for p in common])
                )
        per[n] = entry
    return top, per


# --------------------------------------------------------------------------- plots


def _fmt(x, nd=4):
    return "n/a" if x is None else f"{x:.{nd}g}"


def _errs(ci):
    if ci["half"] is None:
        return 0.0
    return ci["half"]


def write_plots(out: str, summary: dict, rows) -> list[str]:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    folder = os.path.join(out, PLOT_DIR)
    os.makedirs(folder, exist_ok=True)
    rewards = reward_names_of(summary)
    negs = [n["name"] for n in summary["negatives"]]
    cats = list(summary["categories"])
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    nr = len(rewards)
    written = []

    def save(fig, name):
        path = os.path.join(folder, name)
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
        plt.close(fig)
        written.append(f"{PLOT_DIR}/{name}")

    # 1. mean reward with 95% intervals per negative
    fig, axes = plt.subplots(1, nr, figsize=(4.8 * nr, 0.55 * len(negs) + 1.6), squeeze=False)
    for ax, rw in zip(axes[0], rewards):
        m = [summary["means"][rw][n]["all"] for n in negs]
        y = list(range(len(negs)))[::-1]
        for yi, ci, c in zip(y, m, colours * 10):
            ax.errorbar(ci["mean"], yi, xerr=_errs(ci), fmt="o", color=c, capsize=4, ms=7)
        ax.set_yticks(y)
        ax.set_yticklabels([_label(summary, n) for n in negs])
        ax.set_title(f"{rw}: mean, 95% CI")
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle(f"Mean reward per negative ({summary['images_per_negative']} images each)", y=1.02)
    save(fig, "means.png")

    # 2. per category
    fig, axes = plt.subplots(
        nr, 1, figsize=(max(6.0, 1.3 * len(cats) * max(1, len(negs)) / 2 + 2), 3.4 * nr), squeeze=False
    )
    width = 0.8 / max(1, len(negs))
    for ax, rw in zip(axes[:, 0], rewards):
        for j, (n, c) in enumerate(zip(negs, colours * 10)):
            xs = [i - 0.4 + width * (j + 0.5) for i in range(len(cats))]
            pts = [(x, summary["means"][rw][n]["categories"][k]) for x, k in zip(xs, cats)]
            pts = [(x, ci) for x, ci in pts if ci["mean"] is not None]
            ax.errorbar(
                [x for x, _ in pts],
                [ci["mean"] for _, ci in pts],
                yerr=[_errs(ci) for _, ci in pts],
                fmt="o",
                color=c,
                capsize=3,
                label=n,
            )
        ax.set_xticks(range(len(cats)))
        ax.set_xticklabels([f"{k}\n(n={summary['categories'][k]})" for k in cats])
        ax.set_ylabel(rw)
        ax.set_title(f"{rw} per category: mean, 95% CI")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    save(fig, "categories.png")

    # 3. distribution of per-image differences against the reference
    ref = summary["reference"]
    others = [n for n in negs if n != ref]
    fig, axes = plt.subplots(1, nr, figsize=(4.8 * nr, 0.6 * max(1, len(others)) + 2), squeeze=False)
    for ax, rw in zip(axes[0], rewards):
        tab = _table(rows, rw)
        keys = sorted(tab.get(ref, {}))
        data = [[tab[n][k] - tab[ref][k] for k in keys if k in tab.get(n, {})] for n in others]
        if data and all(len(d) > 1 for d in data):
            try:  # matplotlib >= 3.10 names it orientation; older ones only know vert
                ax.violinplot(data, orientation="horizontal", showmeans=True, showextrema=False)
            except TypeError:
                ax.violinplot(data, vert=False, showmeans=True, showextrema=False)
        for i, d in enumerate(data):
            jitter = [(1 + i) + 0.12 * math.sin(7.3 * k) for k in range(len(d))]
            ax.scatter(d, jitter, s=10, alpha=0.6, color=colours[(negs.index(others[i])) % len(colours)])
        ax.axvline(0, color="k", lw=1, ls="--")
        ax.set_yticks(range(1, len(others) + 1))
        ax.set_yticklabels([_label(summary, n) for n in others])
        ax.set_title(f"{rw}: per-image difference vs {ref}")
        ax.set_xlabel(f"score(negative) - score({ref})")
        ax.grid(axis="x", alpha=0.3)
    save(fig, "differences.png")

    # 4. win-rate matrix
    fig, axes = plt.subplots(1, nr, figsize=(1.2 * len(negs) * nr + 2.5 * nr, 1.0 * len(negs) + 1.5), squeeze=False)
    for ax, rw in zip(axes[0], rewards):
        mat = [[summary["win_rates"][rw][a][b]["rate"] if a != b else float("nan") for b in negs] for a in negs]
        im = ax.imshow(mat, vmin=0, vmax=1, cmap="RdYlGn")
        for i, a in enumerate(negs):
            for j, b in enumerate(negs):
                if a != b:
                    w = summary["win_rates"][rw][a][b]
                    ax.text(
                        j,
                        i,
                        f"{w['rate']:.2f}",
                        ha="center",
                        va="center",
                        fontsize=9,
                        color="white" if abs(w["rate"] - 0.5) > 0.3 else "black",
                    )
        ax.set_xticks(range(len(negs)))
        ax.set_xticklabels(negs, rotation=30, ha="right")
        ax.set_yticks(range(len(negs)))
        ax.set_yticklabels(negs)
        ax.set_title(f"{rw}: win rate of row over column")
        fig.colorbar(im, ax=ax, fraction=0.046)
    save(fig, "winrates.png")
    return written


def _label(summary: dict, name: str) -> str:
    """The negative's name, with its image count where it was made for fewer images than the others."""
    n = summary.get("images", {}).get(name)
    return name if n is None or n == summary["images_per_negative"] else f"{name} (n={n})"


def _subset_lines(summary: dict) -> list[str]:
    """Markdown: every negative's mean on the images a partial negative (tuned) was made for."""
    lines = []
    for rw, subs in summary.get("subsets", {}).items():
        for part, m in subs.items():
            lines += [
                "",
                f"On the {summary['images'][part]} images `{part}` was made for ({rw}, mean ± 95% half-interval):",
                "",
                "| negative | mean |",
                "|---|---:|",
            ]
            lines += [f"| `{n}` | {_ci_text(ci)} |" for n, ci in m.items()]
    return lines


# --------------------------------------------------------------------------- markdown


def _ci_text(ci, nd=4) -> str:
    if ci["mean"] is None:
        return "n/a"
    if ci["half"] is None:
        return f"{ci['mean']:.{nd}f}"
    return f"{ci['mean']:.{nd}f} ± {ci['half']:.{nd}f}"


def _diff_text(d) -> str:
    if d["mean"] is None:
        return "n/a"
    if d["lo"] is None:
        return f"{d['mean']:+.4f}"
    return f"{d['mean']:+.4f} [{d['lo']:+.4f}, {d['hi']:+.4f}]"


def _wr_text(w) -> str:
    if w["rate"] is None:
        return "n/a"
    return f"{w['rate']:.2f} [{w['lo']:.2f}, {w['hi']:.2f}]"


def _diversity_of(summary: dict, name: str) -> dict:
    n = next((n for n in summary["negatives"] if n["name"] == name), {})
    return n.get("diversity") or {}


def diversity_shown(summary: dict) -> bool:
    """Whether any negative has a diversity figure (else the report says why not)."""
    return any(_diversity_of(summary, n["name"]).get("mean") for n in summary["negatives"])


def diversity_note(summary: dict) -> str:
    """Why there is no diversity figure (e.g. "diversity needs --images-per-prompt 2 or more"), or ''."""
    d = summary.get("diversity") or {}
    return d.get("note") or ("" if diversity_shown(summary) else "diversity was not measured")


def reward_marks(summary: dict) -> list[tuple[str, str]]:
    """(reward name, its mark: trained on / held out / unknown, per embedding where they disagree)."""
    return [(r["name"], role_text(r)) if isinstance(r, dict) else (r, UNKNOWN) for r in summary.get("rewards", [])]


def markdown(summary: dict) -> str:
    negs = [n["name"] for n in summary["negatives"]]
    ref = summary["reference"]
    lines = [
        f"### {summary['title']}",
        "",
        f"{summary['prompts']} prompts, {summary['images_per_negative']} images per negative; "
        f"mean ± 95% half-interval; paired difference from `{ref}` (same prompt and seed) with its 95% "
        f"interval; win rate over `{ref}` (ties count half) with its 95% Wilson interval.",
        "",
        "Rewards: " + "; ".join(f"`{rw}` ({mark})" for rw, mark in reward_marks(summary)) + ".",
        "",
    ]
    partial = any(_label(summary, n) != n for n in negs)
    div = diversity_shown(summary)
    head = ["negative"] + (["images"] if partial else [])
    for rw in reward_names_of(summary):
        head += [f"{rw} mean", f"{rw} difference vs {ref}", f"{rw} win rate vs {ref}"]
    if div:
        head += ["diversity (same prompt across seeds)", f"diversity difference vs {ref}"]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|")
    for n in negs:
        cells = [f"`{n}`"] + ([str(summary["images"][n])] if partial else [])
        for rw in reward_names_of(summary):
            cells.append(_ci_text(summary["means"][rw][n]["all"]))
            cells.append("—" if n == ref else _diff_text(summary["differences"][rw][n][ref]))
            cells.append("—" if n == ref else _wr_text(summary["win_rates"][rw][n][ref]))
        if div:
            d = _diversity_of(summary, n)
            cells.append(_ci_text(d["mean"]) if d.get("mean") else "n/a")
            dd = d.get("difference_vs_reference")
            cells.append("—" if n == ref else _diff_text(dd) if dd else "n/a")
        lines.append("| " + " | ".join(cells) + " |")
    dsum = summary.get("diversity") or {}
    if div:
        lines += ["", f"Diversity: {dsum.get('measure', '')}; features of `{dsum.get('reward')}`."]
    else:
        lines += ["", f"No diversity figure: {diversity_note(summary)}."]
    cats = list(summary["categories"])
    if len(cats) > 1:
        for rw in reward_names_of(summary):
            lines += ["", f"{rw} per category (mean ± 95% half-interval):", ""]
            lines.append("| negative | " + " | ".join(f"{c} (n={summary['categories'][c]})" for c in cats) + " |")
            lines.append("|---|" + "|".join(["---:"] * len(cats)) + "|")
            for n in negs:
                lines.append(
                    f"| `{n}` | " + " | ".join(_ci_text(summary["means"][rw][n]["categories"][c]) for c in cats) + " |"
                )
    lines += _subset_lines(summary)
    lines += ["", "Negatives: " + "; ".join(f"`{n['name']}` = {n['description']}" for n in summary["negatives"]), ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------- html

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#222;max-width:1400px}
h1{font-size:1.6em;margin-bottom:4px} h2{margin-top:32px;border-bottom:1px solid #ddd;padding-bottom:4px}
.meta{color:#666;font-size:.9em}
table{border-collapse:collapse;margin:8px 0 16px} th,td{border:1px solid #ddd;padding:4px 8px;text-align:right}
th{background:#f4f4f4} td.l,th.l{text-align:left} td.best{font-weight:bold;background:#e8f5e9}
.ci{color:#777;font-size:.85em} .plots{display:flex;flex-wrap:wrap;gap:10px;align-items:flex-start}
.plots img{height:250px;width:auto;max-width:100%;border:1px solid #eee}
table.grid td{text-align:center;vertical-align:top} table.grid td.p{text-align:left;max-width:320px;font-size:.85em}
table.grid img{width:128px;height:auto;image-rendering:pixelated;display:block;margin:auto}
.s{font-size:.8em;color:#444} .s.win{color:#1b5e20;font-weight:bold}
.role{color:#555;font-weight:normal;font-size:.85em}
"""


def _none_low(x):
    return -math.inf if x is None else x


def _e(x) -> str:
    return html.escape(str(x), quote=True)


def grid_items(items, limit: int):
    """At most ``limit`` items, taken round-robin across categories; within each, every prompt's first
    image before any prompt's second (more prompts, fewer seeds of each), in file order."""
    cats = OrderedDict()
    order = {id(it): i for i, it in enumerate(items)}
    for it in sorted(items, key=lambda it: (getattr(it, "k", 0), order[id(it)])):
        cats.setdefault(it.category, []).append(it)
    chosen, lists = [], [list(v) for v in cats.values()]
    while len(chosen) < limit and any(lists):
        for lst in lists:
            if lst and len(chosen) < limit:
                chosen.append(lst.pop(0))
    return sorted(chosen, key=lambda it: (list(cats).index(it.category), getattr(it, "k", 0), order[id(it)]))


def _diversity_cells(d: dict, is_ref: bool) -> list[str]:
    """The main table's two diversity cells of one negative (n/a with the reason as a tooltip)."""
    ci = d.get("mean")
    if not ci:
        why = _e(d.get("note") or "not measured")
        return [f"<td>n/a<br><span class='ci'>{why}</span></td>", "<td>—</td>" if is_ref else "<td>n/a</td>"]
    rng = f"<br><span class='ci'>[{ci['lo']:.4f}, {ci['hi']:.4f}]</span>" if ci["lo"] is not None else ""
    out = [f"<td>{ci['mean']:.4f}{rng}<br><span class='ci'>{ci['n']} prompts</span></td>"]
    dd = d.get("difference_vs_reference")
    if is_ref:
        out.append("<td>—</td>")
    elif not dd or dd["mean"] is None:
        out.append("<td>n/a</td>")
    else:
        drng = f"<br><span class='ci'>[{dd['lo']:+.4f}, {dd['hi']:+.4f}]</span>" if dd["lo"] is not None else ""
        out.append(f"<td>{dd['mean']:+.4f}{drng}</td>")
    return out


def render_html(summary: dict, rows, items, plots: list[str], grid_limit: int = 200) -> str:
    negs = [n["name"] for n in summary["negatives"]]
    rewards = reward_names_of(summary)
    ref = summary["reference"]
    p = []
    p.append(
        f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{_e(summary['title'])}</title>"
        f"<style>{_CSS}</style></head><body>"
    )
    p.append(f"<h1>{_e(summary['title'])}</h1>")
    s = summary["settings"]
    meta = (
        f"{summary['prompts']} prompts, {summary['images_per_negative']} images per negative, "
        f"{len(negs)} negatives; model {_e(os.path.basename(os.path.normpath(str(s.get('model', '')))))}"
        f"{' + motion adapter ' + _e(os.path.basename(os.path.normpath(s['video']))) if s.get('video') else ''}, "
        f"{s.get('sampling_steps')} DDIM steps, {_e(_guidance_text(s))}, {s.get('resolution')} px, "
        f"seeds from {s.get('seed')}. Created {_e(summary['created'])}."
    )
    p.append(f"<p class='meta'>{meta}</p>")
    if s.get("note"):
        p.append(f"<p class='meta'>{_e(s['note'])}</p>")
    p.append(
        "<p class='meta'>Negatives: "
        + "; ".join(f"<b>{_e(n['name'])}</b> = {_e(n['description'])}" for n in summary["negatives"])
        + "</p>"
    )

    # summary table
    p.append("<h2>Summary</h2>")
    p.append(
        f"<p class='meta'>Mean reward with its 95% interval; paired difference from <b>{_e(ref)}</b> "
        f"(same prompt and seed) with its 95% Student-t interval; win rate over <b>{_e(ref)}</b> "
        f"(ties count half) with its 95% Wilson interval. A negative marked n= was made for fewer images "
        f"(--tune-per-prompt) and is compared on those. "
        f"{_e(summary['interval_method'])}.</p>"
    )
    marks = dict(reward_marks(summary))
    p.append(
        "<p class='meta'>Rewards: "
        + "; ".join(f"<b>{_e(rw)}</b> <span class='role'>({_e(marks.get(rw, UNKNOWN))})</span>" for rw in rewards)
        + ". <i>Trained on</i>: an evaluated embedding was trained with this reward (the same kind and "
        "weights file, from the embedding's metadata; a tuned negative is tuned on the first reward), so its "
        "score there shows how well it learned the reward; <i>held out</i>: none was, so it tells whether "
        "the images got better rather than the reward fooled; <i>unknown</i>: the embedding's file does not "
        "say what it was trained with.</p>"
    )
    dsum = summary.get("diversity") or {}
    dnote = diversity_note(summary)
    p.append(
        f"<p class='meta'>Diversity (reward-feature, same prompt across seeds): mean pairwise 1 − cosine of "
        f"the image features of <b>{_e(dsum.get('reward') or 'the first reward with an image tower')}</b> "
        f"between the images of one prompt, averaged over prompts, with its 95% Student-t interval, and its "
        f"paired difference from <b>{_e(ref)}</b> (same prompt). Identical images score 0. A drop against "
        f"the reference is the sign of reward hacking: the images of a prompt converging. "
        + (f"{_e(dsum['video'])}. " if dsum.get("video") else "")
        + (
            f"<b>No diversity figure: {_e(dnote)}</b>."
            if dnote
            else "Per prompt: <a href='diversity.csv'>diversity.csv</a>."
        )
        + "</p>"
    )
    p.append("<table><tr><th class='l'>negative</th>")
    for rw in rewards:
        p.append(
            f"<th>{_e(rw)} mean<br><span class='role'>({_e(marks.get(rw, UNKNOWN))})</span></th>"
            f"<th>difference vs {_e(ref)}</th><th>{_e(rw)} win rate vs {_e(ref)}</th>"
            f"<th>W / T / L</th>"
        )
    p.append(
        f"<th>diversity<br><span class='ci'>(reward-feature, same prompt across seeds)</span></th>"
        f"<th>diversity difference vs {_e(ref)}</th>"
    )
    p.append("</tr>")
    # the best mean among negatives made for every image (means over other image sets do not compare)
    full = [n for n in negs if _label(summary, n) == n] or negs
    best = {rw: max(full, key=lambda n: summary["means"][rw][n]["all"]["mean"]) for rw in rewards}
    for n in negs:
        p.append(f"<tr><td class='l'><b>{_e(_label(summary, n))}</b></td>")
        for rw in rewards:
            ci = summary["means"][rw][n]["all"]
            cls = " class='best'" if best[rw] == n else ""
            rng = f"<br><span class='ci'>[{ci['lo']:.4f}, {ci['hi']:.4f}]</span>" if ci["lo"] is not None else ""
            p.append(f"<td{cls}>{ci['mean']:.4f}{rng}</td>")
            if n == ref:
                p.append("<td>—</td><td>—</td><td>—</td>")
            else:
                w = summary["win_rates"][rw][n][ref]
                dci = summary["differences"][rw][n][ref]
                drng = (
                    f"<br><span class='ci'>[{dci['lo']:+.4f}, {dci['hi']:+.4f}]</span>" if dci["lo"] is not None else ""
                )
                p.append(f"<td>{dci['mean']:+.4f}{drng}</td>")
                p.append(
                    f"<td>{w['rate']:.2f}<br><span class='ci'>[{w['lo']:.2f}, {w['hi']:.2f}]</span></td>"
                    f"<td>{w['wins']} / {w['ties']} / {w['losses']}</td>"
                )
        p += _diversity_cells(_diversity_of(summary, n), n == ref)
        p.append("</tr>")
    p.append("</table>")

    p.append("<h2>Plots</h2><div class='plots'>")
    for pl in plots:
        p.append(f"<a href='{_e(pl)}'><img src='{_e(pl)}' alt='{_e(os.path.basename(pl))}'></a>")
    p.append("</div>")

    # grids
    rw0 = rewards[0]
    score = {(r["prompt_index"], r["seed"], r["negative"]): float(r["score"]) for r in rows if r["reward"] == rw0}
    shown = grid_items(items, grid_limit)
    p.append(
        f"<h2>Images</h2><p class='meta'>One row per prompt and seed, one column per negative, same noise "
        f"in a row. Under each image: its {_e(rw0)} score (bold: best in the row). Showing {len(shown)} of "
        f"{len(items)} rows; every image is in <code>images/</code> and every score in "
        f"<code>scores.csv</code>.</p>"
    )
    current = None
    for it in shown:
        if it.category != current:
            if current is not None:
                p.append("</table>")
            current = it.category
            p.append(f"<h3>{_e(current)}</h3><table class='grid'><tr><th class='l'>prompt</th>")
            p += [f"<th>{_e(n)}</th>" for n in negs]
            p.append("</tr>")
        vals = {n: score.get((it.index, it.seed, n)) for n in negs}
        top = max((v for v in vals.values() if v is not None), default=None)
        p.append(f"<tr><td class='p'>{_e(it.text)}<br><span class='ci'>#{it.index}, seed {it.seed}</span></td>")
        for n in negs:
            src = f"images/{it.image_name(n)}"
            v = vals[n]
            if v is None and _label(summary, n) != n:
                p.append("<td><span class='s'>not made</span></td>")
                continue
            cls = "s win" if v is not None and v == top else "s"
            p.append(
                f"<td><img src='{_e(src)}' alt='{_e(n)}' loading='lazy' title='{_e(n)}: {_e(_fmt(v))}'>"
                f"<span class='{cls}'>{_e(_fmt(v))}</span></td>"
            )
        p.append("</tr>")
    if current is not None:
        p.append("</table>")
    d = ["<h2>Details</h2>"]
    cats = list(summary["categories"])
    if len(cats) > 1:
        for rw in rewards:
            d.append(f"<h3>{_e(rw)} per category</h3><table><tr><th class='l'>negative</th>")
            d += [f"<th>{_e(c)} (n={summary['categories'][c]})</th>" for c in cats]
            d.append("</tr>")
            for n in negs:
                d.append(f"<tr><td class='l'>{_e(n)}</td>")
                for c in cats:
                    ci = summary["means"][rw][n]["categories"][c]
                    top = max(negs, key=lambda m: _none_low(summary["means"][rw][m]["categories"][c]["mean"]))
                    cls = " class='best'" if top == n else ""
                    d.append(f"<td{cls}>{_e(_ci_text(ci))}</td>")
                d.append("</tr>")
            d.append("</table>")

    for rw in rewards:
        d.append(f"<h3>{_e(rw)}: win rate of row over column</h3><table><tr><th class='l'></th>")
        d += [f"<th>{_e(b)}</th>" for b in negs]
        d.append("</tr>")
        for a in negs:
            d.append(f"<tr><td class='l'><b>{_e(a)}</b></td>")
            for b in negs:
                if a == b:
                    d.append("<td>—</td>")
                else:
                    w = summary["win_rates"][rw][a][b]
                    d.append(
                        f"<td>{w['rate']:.2f} <span class='ci'>[{w['lo']:.2f}, {w['hi']:.2f}] "
                        f"{w['wins']}/{w['ties']}/{w['losses']}</span></td>"
                    )
            d.append("</tr>")
        d.append("</table>")

    for rw, subs in summary.get("subsets", {}).items():
        for part, m in subs.items():
            d.append(
                f"<h3>{_e(rw)} on the {summary['images'][part]} images {_e(part)} was made for</h3>"
                f"<table><tr><th class='l'>negative</th><th>mean</th></tr>"
            )
            top = max(m, key=lambda k: _none_low(m[k]["mean"]))
            for n, ci in m.items():
                cls = " class='best'" if n == top else ""
                d.append(f"<tr><td class='l'>{_e(n)}</td><td{cls}>{_e(_ci_text(ci))}</td></tr>")
            d.append("</table>")

    if summary.get("tuning"):
        d.append(
            "<h3>Per-sample tuning</h3><table><tr><th class='l'>negative</th><th>images</th>"
            "<th>mean start reward</th><th>mean best reward</th><th>improved</th><th>mean steps</th></tr>"
        )
        for name, t in summary["tuning"].items():
            d.append(
                f"<tr><td class='l'>{_e(name)}</td><td>{t['tuned_images']}</td>"
                f"<td>{t['mean_start_reward']:.4f}</td><td>{t['mean_best_reward']:.4f}</td>"
                f"<td>{t['improved']}</td><td>{t['mean_steps']:.1f}</td></tr>"
            )
        d.append("</table>")

    p += d
    p.append(
        "<p class='meta'>Made by <code>reneg eval</code>. Files: <a href='summary.json'>summary.json</a>, "
        "<a href='scores.csv'>scores.csv</a>, <a href='diversity.csv'>diversity.csv</a>, "
        "<a href='report.md'>report.md</a>.</p></body></html>"
    )
    return "\n".join(p)


# --------------------------------------------------------------------------- grid.png

GRID_PNG = "grid.png"


def write_grid_png(out: str, summary: dict, rows, items, rows_limit: int = 12, cell: int = 96) -> str | None:
    """One picture to paste anywhere: a row per prompt and seed (round-robin across categories, only images
    every negative has), a column per negative, each image's score under it (best of the row marked)."""
    from PIL import Image, ImageDraw, ImageFont

    negs = [n["name"] for n in summary["negatives"]]
    rw0 = reward_names_of(summary)[0]
    score = {(r["prompt_index"], r["seed"], r["negative"]): float(r["score"]) for r in rows if r["reward"] == rw0}
    full = [it for it in items if all((it.index, it.seed, n) in score for n in negs)]
    shown = grid_items(full, rows_limit)
    if not shown:
        return None
    font = ImageFont.load_default()
    label_w, head_h, foot_h, pad = 230, 22, 16, 6
    width = label_w + len(negs) * (cell + pad) + pad
    height = head_h + len(shown) * (cell + foot_h + pad) + pad
    sheet = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for j, n in enumerate(negs):
        draw.text((label_w + j * (cell + pad) + pad, 5), n[:18], fill=(0, 0, 0), font=font)
    for i, it in enumerate(shown):
        y = head_h + i * (cell + foot_h + pad) + pad
        words, lines, line = it.text.split(), [], ""
        for w in words:
            if len(line) + len(w) + 1 > 36 and line:
                lines.append(line)
                line = w
            else:
                line = f"{line} {w}".strip()
        lines.append(line)
        for k, t in enumerate(lines[:6] + [f"seed {it.seed}"]):
            draw.text((pad, y + 2 + 13 * k), t, fill=(60, 60, 60) if k < len(lines[:6]) else (130, 130, 130), font=font)
        vals = [score[(it.index, it.seed, n)] for n in negs]
        for j, (n, v) in enumerate(zip(negs, vals)):
            x = label_w + j * (cell + pad) + pad
            path = os.path.join(out, "images", it.image_name(n))
            try:
                with Image.open(path) as im:
                    im = im.convert("RGB")
                    resample = Image.NEAREST if im.width < cell else Image.LANCZOS
                    sheet.paste(im.resize((cell, cell), resample), (x, y))
            except OSError:
                draw.rectangle((x, y, x + cell, y + cell), outline=(200, 0, 0))
            best = v == max(vals)
            draw.text(
                (x + 2, y + cell + 2),
                f"{v:.4f}" + (" *" if best else ""),
                fill=(27, 94, 32) if best else (70, 70, 70),
                font=font,
            )
    path = os.path.join(out, GRID_PNG)
    with atomic_path(path) as tmp:
        sheet.save(tmp, format="PNG")
    return path


# --------------------------------------------------------------------------- all outputs


def _guidance_text(s: dict) -> str:
    """The guidance the images were made under, as the settings say (NAG's own settings where given)."""
    mode = s.get("guidance_mode") or "cfg"
    if mode == "cfg":
        return f"CFG {s.get('guidance')}"
    given = ", ".join(f"{k[4:]} {s[k]:g}" for k in ("nag_scale", "nag_tau", "nag_alpha") if s.get(k) is not None)
    nag = f"NAG ({given or 'the family defaults'})"
    return nag if mode == "nag" else f"CFG {s.get('guidance')} + {nag}"


def write_report(out, summary, rows, items, negatives, reward_names, cfg) -> dict:
    atomic_write_json(os.path.join(out, "summary.json"), summary)
    plots = write_plots(out, summary, rows)
    grid = write_grid_png(out, summary, rows, items)
    md = markdown(summary)
    if grid:
        md += f"\n![{GRID_PNG}: images per prompt and negative]({GRID_PNG})\n"
    atomic_write_text(os.path.join(out, "report.md"), md)
    atomic_write_text(
        os.path.join(out, "report.html"),
        render_html(summary, rows, items, plots + ([GRID_PNG] if grid else []), getattr(cfg, "grid_limit", 200)),
    )
    return {
        "summary": os.path.join(out, "summary.json"),
        "html": os.path.join(out, "report.html"),
        "markdown": os.path.join(out, "report.md"),
        "plots": plots,
        "grid": grid,
    }
