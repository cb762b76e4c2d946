"""Rebuild `data/train_data.jsonl`, a small domain-tagged corpus, from text that any machine with Python has.

    code     Python standard-library modules, cut at top-level definitions
    general  the Python reference's topic texts (`pydoc_data.topics`) and standard-library module docstrings
    legal    licence texts found on this machine: Python's LICENSE, /usr/share/common-licenses, the LICENSE
             files of installed packages, Debian's /usr/share/doc/*/copyright; deduplicated
    math     generated arithmetic and algebra problems with worked answers
    science  generated unit conversions, physics and chemistry calculations with worked answers

The output is deterministic for a given seed on a given machine; another machine (another Python, other
packages) yields a similar but not identical corpus. With `--tokenizer DIR` it also trains the default tokenizer.

    python data/build_corpus.py --seed 0 --tokenizer data/tokenizer
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import math
import random
import re
import sys
import sysconfig
from fractions import Fraction
from pathlib import Path
from typing import Callable, Iterator

HERE = Path(__file__).resolve().parent
# Characters per domain (the file is a little larger: JSON escapes newlines and quotes).
BUDGET = {"code": 750_000, "general": 550_000, "legal": 400_000, "math": 350_000, "science": 300_000}
DOC_CHARS = 4000
SKIP_STDLIB = {"test", "idlelib", "tkinter", "lib2to3", "ensurepip", "pydoc_data", "encodings", "site-packages",
               "turtledemo", "__phello__", "unittest", "distutils"}


# ---- splitting real text into documents ------------------------------------------------------------------
def group(pieces: list[str], limit: int = DOC_CHARS) -> Iterator[str]:
    """Consecutive pieces joined into documents of at most ~`limit` characters."""
    buf = ""
    for p in pieces:
        if buf and len(buf) + len(p) > limit:
            yield buf
            buf = ""
        buf += p
    if buf.strip():
        yield buf


def paragraphs(text: str) -> list[str]:
    return [p + "\n\n" for p in re.split(r"\n\s*\n", text.strip()) if p.strip()]


def top_level_blocks(source: str) -> list[str]:
    """A module cut before each top-level `def`, `class` or decorator."""
    return [b for b in re.split(r"(?m)^(?=(?:def |class |async def |@))", source) if b.strip()]


def read_text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None


def stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.rglob("*.py") if not SKIP_STDLIB & set(p.relative_to(root).parts))


def take(documents: Iterator[str], budget: int) -> list[str]:
    out, size = [], 0
    for d in documents:
        if size >= budget:
            break
        out.append(d)
        size += len(d)
    return out


def code_docs(files: list[Path], rng: random.Random) -> tuple[list[str], list[Path]]:
    """Documents from a seeded selection of modules; also returns the modules left unused."""
    order = files[:]
    rng.shuffle(order)
    docs, size, used = [], 0, 0
    for used, path in enumerate(order, 1):
        text = read_text(path)
        if not text:
            continue
        docs += group(top_level_blocks(text))
        size = sum(map(len, docs))
        if size >= BUDGET["code"]:
            break
    return docs, order[used:]


def general_docs(unused_modules: list[Path]) -> list[str]:
    import pydoc_data.topics
    topics = pydoc_data.topics.topics
    pieces = [p for name in sorted(topics) for p in paragraphs(topics[name])]
    docstrings = []
    for path in unused_modules:
        text = read_text(path)
        try:
            doc = ast.get_docstring(ast.parse(text or "")) if text else None
        except (SyntaxError, ValueError):
            doc = None
        if doc and len(doc) >= 200:
            docstrings.append(doc.strip() + "\n")
    return take(iter(list(group(pieces)) + docstrings), BUDGET["general"])


def licence_files() -> list[Path]:
    paths = [Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt"]
    paths += sorted(Path("/usr/share/common-licenses").glob("*"))
    purelib = Path(sysconfig.get_paths()["purelib"])
    paths += sorted(p for p in purelib.glob("*.dist-info/**/*")
                    if p.name.upper().startswith(("LICENSE", "COPYING", "NOTICE")))
    paths += sorted(Path("/usr/share/doc").glob("*/copyright"))
    return [p for p in paths if p.is_file()]


def legal_docs(rng: random.Random) -> list[str]:
    seen, texts = set(), []
    for path in licence_files():
        text = read_text(path)
        if not text or len(text) < 300:
            continue
        key = hashlib.sha1(" ".join(text.split()).lower().encode()).hexdigest()
        if key not in seen:
            seen.add(key)
            texts.append(text)
    # the well-known licences first (they are what the first few files hold), then a seeded mix of the rest
    head, tail = texts[:20], texts[20:]
    rng.shuffle(tail)
    return take((d for t in head + tail for d in group(paragraphs(t))), BUDGET["legal"])


# ---- generated math ------------------------------------------------------------------------------------------
def arithmetic(r: random.Random) -> str:
    a, b = r.randint(10, 9999), r.randint(10, 9999)
    op = r.choice("+-*")
    if op == "*":
        a, b = r.randint(11, 99), r.randint(11, 999)
        tens, ones = b - b % 10, b % 10
        return (f"Compute {a} × {b}.\nSplit {b} = {tens} + {ones}: {a} × {tens} = {a * tens} and {a} × {ones} = "
                f"{a * ones}.\nSo {a} × {b} = {a * tens} + {a * ones} = {a * b}.")
    return f"Compute {a} {op} {b}.\n{a} {op} {b} = {a + b if op == '+' else a - b}."


def division(r: random.Random) -> str:
    d, q, rem = r.randint(2, 40), r.randint(2, 500), 0
    rem = r.randint(0, d - 1)
    n = d * q + rem
    return (f"Divide {n} by {d}.\n{d} × {q} = {d * q}, and {n} − {d * q} = {rem}.\n"
            f"So {n} ÷ {d} = {q} remainder {rem}" + (f", that is {Fraction(n, d)} as a fraction." if rem else "."))


def linear(r: random.Random) -> str:
    a, x, b = r.choice([2, 3, 4, 5, 6, 7, 8, 9, -2, -3]), r.randint(-20, 20), r.randint(-50, 50)
    c = a * x + b
    sign = "+" if b >= 0 else "−"
    return (f"Solve {a}x {sign} {abs(b)} = {c}.\n" + (f"Subtract {b} from both sides" if b >= 0 else
                                                      f"Add {-b} to both sides")
            + f": {a}x = {c - b}.\nDivide both sides by {a}: x = {x}.\nCheck: {a} × {x} {sign} {abs(b)} = {c}.")


def fractions(r: random.Random) -> str:
    p, q = (Fraction(r.randint(1, d - 1), d) for d in (r.randint(2, 12), r.randint(2, 12)))
    den = p.denominator * q.denominator // math.gcd(p.denominator, q.denominator)
    a, b = p.numerator * den // p.denominator, q.numerator * den // q.denominator
    return (f"Add {p} + {q}.\nThe least common denominator is {den}: {p} = {a}/{den} and {q} = {b}/{den}.\n"
            f"{a}/{den} + {b}/{den} = {a + b}/{den}" + (f" = {p + q}." if (p + q).denominator != den else "."))


def percent(r: random.Random) -> str:
    pct, base = r.choice([5, 10, 12, 15, 20, 25, 30, 40, 50, 75]), r.randint(2, 80) * 20
    return f"What is {pct}% of {base}?\n{pct}% = {pct / 100:g}, and {pct / 100:g} × {base} = {pct * base / 100:g}."


def gcd_steps(r: random.Random) -> str:
    g = r.randint(2, 30)
    a, b = g * r.randint(5, 60), g * r.randint(2, 40)
    a, b = max(a, b), min(a, b)
    lines, x, y = [], a, b
    while y:
        lines.append(f"{x} = {x // y} × {y} + {x % y}")
        x, y = y, x % y
    return f"Find gcd({a}, {b}) with Euclid's algorithm.\n" + "\n".join(lines) + f"\nSo gcd({a}, {b}) = {x}."


def quadratic(r: random.Random) -> str:
    p, q = r.randint(-12, 12), r.randint(-12, 12)
    b, c = -(p + q), p * q
    poly = "x²" + (f" {'+' if b >= 0 else '−'} {abs(b)}x" if b else "") + (f" {'+' if c >= 0 else '−'} {abs(c)}"
                                                                            if c else "")
    f1, f2 = (f"(x {'−' if v >= 0 else '+'} {abs(v)})" if v else "x" for v in (p, q))
    roots = sorted({p, q})
    return (f"Solve {poly} = 0.\nWe need two numbers with product {c} and sum {-b}: {p} and {q}.\n"
            f"So {poly} = {f1}{f2}, and x = " + " or x = ".join(map(str, roots)) + ".")


def system2(r: random.Random) -> str:
    x, y = r.randint(-10, 10), r.randint(-10, 10)
    a, b, c, d = r.randint(1, 6), r.randint(1, 6), r.randint(1, 6), r.randint(-6, -1)
    e, f = a * x + b * y, c * x + d * y
    return (f"Solve the system {a}x + {b}y = {e} and {c}x − {-d}y = {f}.\n"
            f"Multiply the first by {c} and the second by {a}: {a * c}x + {b * c}y = {e * c} and "
            f"{a * c}x − {-d * a}y = {f * a}.\nSubtract: {b * c - d * a}y = {e * c - f * a}, so y = {y}.\n"
            f"Then {a}x = {e} − {b} × {y} = {e - b * y}, so x = {x}.")


def series(r: random.Random) -> str:
    a, d, n = r.randint(1, 20), r.randint(1, 9), r.randint(5, 60)
    last = a + (n - 1) * d
    return (f"Sum the arithmetic series {a} + {a + d} + {a + 2 * d} + ... + {last} ({n} terms).\n"
            f"The sum is n × (first + last) / 2 = {n} × ({a} + {last}) / 2 = {n * (a + last) // 2}.")


def powers(r: random.Random) -> str:
    b, e = r.randint(2, 12), r.randint(2, 6)
    s = r.randint(4, 40)
    return (f"Compute {b}^{e}.\n" + " × ".join([str(b)] * e) + f" = {b ** e}.\n"
            f"The square root of {s * s} is {s}, because {s} × {s} = {s * s}.")


MATH = (arithmetic, division, linear, fractions, percent, gcd_steps, quadratic, system2, series, powers)


# ---- generated science ------------------------------------------------------------------------------------
def conversion(r: random.Random) -> str:
    kind = r.randrange(5)
    if kind == 0:
        c = r.randint(-40, 120)
        return (f"Convert {c} °C to Fahrenheit and kelvin.\nF = C × 9/5 + 32 = {c} × 1.8 + 32 = {c * 1.8 + 32:g} °F."
                f"\nK = C + 273.15 = {c + 273.15:.2f} K.")
    if kind == 1:
        mi = r.randint(1, 500)
        return f"Convert {mi} miles to kilometres.\nOne mile is 1.609344 km, so {mi} mi = {mi * 1.609344:.3f} km."
    if kind == 2:
        kg = r.randint(1, 200)
        return f"Convert {kg} kg to pounds.\nOne kilogram is about 2.20462 lb, so {kg} kg ≈ {kg * 2.20462:.2f} lb."
    if kind == 3:
        h, m = r.randint(1, 48), r.randint(0, 59)
        return f"How many seconds are {h} h {m} min?\n{h} × 3600 + {m} × 60 = {h * 3600 + m * 60} s."
    kmh = r.randint(5, 300)
    return f"Convert {kmh} km/h to m/s.\n1 km/h = 1000 m / 3600 s, so {kmh} km/h = {kmh / 3.6:.2f} m/s."


def physics(r: random.Random) -> str:
    kind = r.randrange(8)
    m, v = r.randint(1, 100), r.randint(1, 40)
    if kind == 0:
        d, t = r.randint(10, 5000), r.randint(2, 600)
        return f"A car covers {d} m in {t} s. Its average speed is v = d / t = {d} / {t} = {d / t:.2f} m/s."
    if kind == 1:
        a = r.randint(1, 20)
        return f"A net force accelerates a {m} kg mass at {a} m/s². By Newton's second law F = m a = {m * a} N."
    if kind == 2:
        return (f"Kinetic energy of a {m} kg body at {v} m/s: E = ½ m v² = 0.5 × {m} × {v}² = "
                f"{0.5 * m * v * v:g} J.")
    if kind == 3:
        h = r.randint(1, 100)
        return (f"Lifting {m} kg by {h} m stores E = m g h = {m} × 9.81 × {h} = {m * 9.81 * h:.1f} J of potential "
                f"energy.")
    if kind == 4:
        i, res = r.randint(1, 20), r.randint(1, 200)
        return (f"A current of {i} A flows through {res} Ω. Ohm's law gives V = I R = {i * res} V, and the power "
                f"is P = V I = {i * i * res} W.")
    if kind == 5:
        f, lam = r.randint(100, 2000), r.choice([0.1, 0.2, 0.25, 0.5, 1.0, 2.0])
        return f"A wave of frequency {f} Hz and wavelength {lam} m travels at v = f λ = {f * lam:g} m/s."
    if kind == 6:
        h = r.randint(1, 200)
        return (f"An object dropped from {h} m (no air resistance) lands after t = √(2h / g) = √(2 × {h} / 9.81) = "
                f"{math.sqrt(2 * h / 9.81):.2f} s.")
    vol = r.randint(1, 50)
    return f"A {m} kg block of volume {vol} L has density ρ = m / V = {m} / {vol} = {m / vol:.3f} kg/L."


ATOMIC = {"H": 1.008, "C": 12.011, "N": 14.007, "O": 15.999, "Na": 22.990, "Cl": 35.45, "S": 32.06}
MOLECULES = {"water": {"H": 2, "O": 1}, "carbon dioxide": {"C": 1, "O": 2}, "methane": {"C": 1, "H": 4},
             "ammonia": {"N": 1, "H": 3}, "sodium chloride": {"Na": 1, "Cl": 1}, "oxygen gas": {"O": 2},
             "glucose": {"C": 6, "H": 12, "O": 6}, "sulfuric acid": {"H": 2, "S": 1, "O": 4}}


def chemistry(r: random.Random) -> str:
    name = r.choice(sorted(MOLECULES))
    parts = MOLECULES[name]
    formula = "".join(f"{el}{n if n > 1 else ''}" for el, n in parts.items())
    mass = sum(ATOMIC[el] * n for el, n in parts.items())
    grams = r.randint(1, 500)
    terms = " + ".join(f"{n} × {ATOMIC[el]}" for el, n in parts.items())
    return (f"The molar mass of {name} ({formula}) is {terms} = {mass:.3f} g/mol.\n"
            f"So {grams} g of {name} is {grams} / {mass:.3f} = {grams / mass:.4f} mol.")


SCIENCE = (conversion, physics, chemistry)


def generated(makers: tuple[Callable[[random.Random], str], ...], budget: int, rng: random.Random) -> list[str]:
    def documents() -> Iterator[str]:
        while True:
            n = rng.randint(4, 12)
            yield "\n\n".join(f"Problem {k + 1}. " + rng.choice(makers)(rng) for k in range(n)) + "\n"
    return take(documents(), budget)


# ---- the corpus ------------------------------------------------------------------------------------------
def build(seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    code, unused = code_docs(stdlib_files(), rng)
    domains = {"code": code, "general": general_docs(unused), "legal": legal_docs(rng),
               "math": generated(MATH, BUDGET["math"], rng), "science": generated(SCIENCE, BUDGET["science"], rng)}
    records = [{"domain": d, "text": t} for d, texts in domains.items() for t in texts]
    rng.shuffle(records)
    return records


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=HERE / "train_data.jsonl")
    ap.add_argument("--tokenizer", type=Path, default=None, help="also train a tokenizer into this directory")
    ap.add_argument("--vocab-size", type=int, default=8192)
    args = ap.parse_args(argv)
    records = build(args.seed)
    with open(args.out, "w", encoding="utf-8", newline="\n") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    counts: dict[str, int] = {}
    for r in records:
        counts[r["domain"]] = counts.get(r["domain"], 0) + len(r["text"])
    print(f"wrote {args.out}: {len(records)} documents, {args.out.stat().st_size / 1e6:.2f} MB; characters per "
          f"domain: " + ", ".join(f"{d} {n}" for d, n in sorted(counts.items())), file=sys.stderr)
    if args.tokenizer:
        sys.path.insert(0, str(HERE.parent))
        from dh_mlx.train.tokenizer import train_tokenizer
        tok = train_tokenizer(args.out, args.tokenizer, vocab_size=args.vocab_size, seed=args.seed)
        print(f"wrote {args.tokenizer}: vocabulary {tok.vocab_size}", file=sys.stderr)


if __name__ == "__main__":
    main()
