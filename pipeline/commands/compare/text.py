"""The comparison report as the lines a person reads (`pipeline compare` without --json)."""

from __future__ import annotations

from typing import Any

from pipeline.commands.compare.core import ImageResult, Report

WORST_SHOWN = 10


def format_report(report: Report, worst: int = WORST_SHOWN) -> str:
    summary, unpaired = report.summary, report.unpaired
    lines = [
        f"compare {report.b} against {report.a}: task {report.task}, "
        f"{summary['images']:,} images both answered",
        _unpaired_line(unpaired),
        *OVERALL[report.task if report.task in OVERALL else "objects"](report),
    ]
    shown = [image for image in report.images if image.score < 1][:worst]
    if shown:
        lines.append(f"worst images (of {_disagreeing(report):,} that disagree):")
        lines += [f"  {image.score:.3f}  {image.image_path}  {_detail(image)}" for image in shown]
    return "\n".join(lines)


def _disagreeing(report: Report) -> int:
    return sum(image.score < 1 for image in report.images)


def _unpaired_line(unpaired: dict[str, int]) -> str:
    return (
        f"not compared: {unpaired['only_in_a']:,} only in A, {unpaired['only_in_b']:,} only in "
        f"B; no answer (error or blocked) in A {unpaired['no_answer_in_a']:,}, in B "
        f"{unpaired['no_answer_in_b']:,}, in both {unpaired['no_answer_in_both']:,}"
    )


def _objects(report: Report) -> list[str]:
    s, t = report.summary, report.thresholds
    near = (
        f"within {t.radius:g} px, mean distance {_num(s.get('mean_distance'), '.1f')} px"
        if report.task == "point"
        else f"at IoU >= {t.iou:g}, mean IoU {_num(s.get('mean_iou'))}"
    )
    return [
        f"objects: A {s['in_a']:,}, B {s['in_b']:,}; matched {s['matched']:,} {near}; "
        f"only in A {s['only_in_a']:,}, only in B {s['only_in_b']:,}",
        f"B against A: precision {_num(s['precision'])}, recall {_num(s['recall'])}, "
        f"F1 {_num(s['f1'])}",
        f"labels ({t.labels}): {_num(s['label_agreement'], '.1%')} of matches agree; "
        f"agreement (F1 of matches that agree on their label) {_num(s['agreement'])}",
    ]


def _classify(report: Report) -> list[str]:
    s = report.summary
    return [
        f"labels ({report.thresholds.labels}): {s['images_agreeing']:,} images the same "
        f"({_num(s['agreement'], '.1%')}); Cohen's kappa {_num(s['kappa'])}; "
        f"mean Jaccard {_num(s['mean_jaccard'])}"
    ]


def _caption(report: Report) -> list[str]:
    s = report.summary
    return [
        f"captions: mean token F1 {_num(s['token_f1'])}; words B/A {_num(s['length_ratio'])} "
        f"({s['words_b']:,} / {s['words_a']:,})"
    ]


def _custom(report: Report) -> list[str]:
    s = report.summary
    return [f"answers: {s['images_agreeing']:,} the same JSON ({_num(s['agreement'], '.1%')})"]


OVERALL = {
    "objects": _objects,
    "point": _objects,
    "classify": _classify,
    "caption": _caption,
    "custom": _custom,
}


def _detail(image: ImageResult) -> str:
    d = image.detail
    if "matched" in d:
        slips = "; ".join(f"{a!r} vs {b!r}" for a, b in d["label_slips"][:3])
        return (
            f"A {d['in_a']}, B {d['in_b']}, matched {d['matched']}, labels agree "
            f"{d['labels_agree']}" + (f" ({slips})" if slips else "")
        )
    if "labels_a" in d:
        return f"A {d['labels_a']} vs B {d['labels_b']}"
    if "token_f1" in d:
        return f"words A {d['words_a']}, B {d['words_b']}"
    return "different answers"


def _num(value: Any, spec: str = ".3f") -> str:
    return "n/a" if value is None else format(value, spec)
