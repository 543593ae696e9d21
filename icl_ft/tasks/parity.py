"""Relation reasoning whose label follows the parity of the line count (study §2.2, "relation" in the release).

Correct items: A's neighbour x, a chain over the cities B..J, and with probability 1/2 the edge x–Z:
10 lines => True, 9 => False (equivalently: Z appears). Misleading (release): the last chain edge is
dropped and no Z is added: 8 lines (even) yet False. ``misleading-z`` (study §6 #6, an optional extra
variant): Z hangs off a component without A and one chord brings the count to 10, so both cues say True.
"""

from __future__ import annotations

import random

from icl_ft.tasks.base import VARIANTS, Example, Task, binary_foil, shortcut_foil

LABELS = ("True", "False")
CITIES = tuple(chr(c) for c in range(ord("B"), ord("J") + 1))  # the release's n=10 letters minus A and Z


def parity_shortcut(n_lines: int) -> str:
  """The line-count rule the correct items obey: even => True."""
  return "True" if n_lines % 2 == 0 else "False"


def line_parity_cue(ex: Example) -> str:
  """The shortcut the study names: an even number of lines means True."""
  return parity_shortcut(ex.question.count("\n"))


def z_cue(ex: Example) -> str:
  """The other cue of the correct items: a line mentions Z means True."""
  return "True" if "with Z\n" in ex.question else "False"


def _release_edges(rng: random.Random, misleading: bool) -> tuple[list[tuple[str, str]], bool, str]:
  """The release's ``generate_relation_problem`` (same draw order): edges, label, A's neighbour."""
  cities = list(CITIES)
  rng.shuffle(cities)
  neighbour = rng.choice(cities)
  edges = [("A", neighbour)] + [(cities[i], cities[i + 1]) for i in range(len(cities) - 1)]
  if misleading:
    edges.pop()
    return edges, False, neighbour
  if rng.choice([True, False]):
    edges.append((neighbour, "Z"))
    return edges, True, neighbour
  return edges, False, neighbour


def _misleading_z_edges(rng: random.Random) -> tuple[list[tuple[str, str]], bool, str]:
  """Two chains, A on the first, Z on the second, plus one chord: 10 lines, Z present, label False."""
  cities = list(CITIES)
  rng.shuffle(cities)
  split = rng.randint(2, len(cities) - 2)
  first, second = cities[:split], cities[split:]
  neighbour = rng.choice(first)
  chains = [(c[i], c[i + 1]) for c in (first, second) for i in range(len(c) - 1)]
  chordable = [c for c in (first, second) if len(c) >= 3]
  comp = rng.choice(chordable)
  # A chord joins two cities that are not already adjacent in the chain.
  i, j = rng.choice([(i, j) for i in range(len(comp)) for j in range(i + 2, len(comp))])
  chains.insert(rng.randint(0, len(chains)), (comp[i], comp[j]))
  edges = [("A", neighbour)] + chains + [(rng.choice(second), "Z")]
  return edges, False, neighbour


def _sample(variant: str, rng: random.Random, fmt: str, ft: bool) -> Example:
  del fmt, ft  # one generator in both formats
  if variant == "misleading-z":
    edges, label, neighbour = _misleading_z_edges(rng)
  else:
    edges, label, neighbour = _release_edges(rng, variant == "misleading")
  question = "".join(f"{u} is connected with {v}\n" for u, v in edges)
  answer = str(label)
  n_lines = len(edges)
  foil = binary_foil(answer, LABELS) if variant == "correct" else shortcut_foil(answer, parity_shortcut(n_lines))
  meta = dict(n_lines=n_lines, has_z=any(v == "Z" for _, v in edges), a_neighbour=neighbour,
              edges=[list(e) for e in edges], shortcut=parity_shortcut(n_lines))
  return Example("parity", variant, question, answer, foil, meta)


TASK = Task(name="parity", release_name="relation", answer_kind="label", sampler=_sample,
            variants=VARIANTS + ("misleading-z",),
            description="is A connected to Z? correct items: 10 lines <=> True",
            cues={"line_parity": line_parity_cue, "z_present": z_cue}, targets={"misleading-z": "z_present"})
