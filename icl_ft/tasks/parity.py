"""Relation reasoning whose label follows the parity of the line count ("relation" in the release;
docs/tasks.md).

Correct items: A's neighbour x, a chain over the cities B..J, and with probability 1/2 the edge x–Z:
10 lines => True, 9 => False (equivalently: Z appears). Misleading (release): the last chain edge is
dropped and no Z is added: 8 lines (even) yet False. ``misleading-z`` (ours): Z hangs off a component without
A and one chord brings the count to 10, so both cues say True.
"""

from __future__ import annotations

import collections
import random
import re

from icl_ft.tasks.base import (ANSWER_UNCHANGED, FORMATS, LABEL_FALSE, VARIANTS, Corruption, Example, Task, binary_foil,
                               shortcut_foil)
from icl_ft.tasks.formats import EXAMPLES, Template, budget, solved

_INSTRUCTION = " So 'the city A and Z is connected' is "
UNUSED_CITIES = tuple(chr(c) for c in range(ord("K"), ord("Y") + 1))  # never drawn by the generator

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


_EDGE = re.compile(r"([A-Z]) is connected with ([A-Z])")


def relation_connected(question: str, start: str = "A", goal: str = "Z") -> bool:
  """Whether ``start`` reaches ``goal`` in the undirected graph of the question's ``u is connected with v`` lines."""
  graph = collections.defaultdict(set)
  for line in question.splitlines():
    if not line:
      continue
    edge = _EDGE.fullmatch(line)
    if edge is None:
      raise ValueError(f"not a relation line: {line!r}")
    u, v = edge.groups()
    graph[u].add(v)
    graph[v].add(u)
  seen, queue = {start}, collections.deque([start])
  while queue:
    for nxt in graph[queue.popleft()] - seen:
      seen.add(nxt)
      queue.append(nxt)
  return goal in seen


def corrupt(ex: Example, rng: random.Random) -> Corruption | str:
  """A True item (10 lines, last ``x is connected with Z``) whose ``Z`` becomes an unused letter (K..Y), so A no
  longer reaches Z: answer False; the labels are recomputed by graph search."""
  if ex.answer != "True":
    return LABEL_FALSE
  lines = ex.question.splitlines(keepends=True)
  last = lines[-1]
  if not (last.endswith(" is connected with Z\n") and len(lines) == 10):
    raise RuntimeError(f"unexpected True relation item: {ex.question!r}")
  used = set(re.findall(r"[A-Z]", ex.question))
  letter = rng.choice([c for c in UNUSED_CITIES if c not in used])
  corrupt_q = "".join(lines[:-1]) + last[:-2] + letter + "\n"
  clean, corrupt = str(relation_connected(ex.question)), str(relation_connected(corrupt_q))
  if clean != ex.answer:
    raise RuntimeError(f"generator label {ex.answer!r} != graph search {clean!r} for {ex.question!r}")
  if clean == corrupt:
    return ANSWER_UNCHANGED
  return Corruption(corrupt_q, clean, corrupt, dict(replaced="Z", letter=letter))


def _query(ex: Example) -> str:
  return f"{ex.question}\n{_INSTRUCTION}"


TEMPLATES = {fmt: Template(
    header=("Here are some cities expressed as A, B, C, etc. I will show some connection relations, and you "
            "need to tell me if city A and city Z are connected (Answer True or False). " + EXAMPLES),
    demo=solved(_query, "\n"), query=_query, ft=solved(_query), generation_len=budget(2, fmt),
    answer_space=fmt == "fixed")  # " True" is one token in the demos and FT texts: the prompt ends before it
    for fmt in FORMATS}

TASK = Task(name="parity", irrelevant_from="boolean", release_name="relation", answer_kind="label", sampler=_sample, templates=TEMPLATES,
            corrupt=corrupt,
            variants=VARIANTS + ("misleading-z",), lenient_digits=True,
            description="is A connected to Z? correct items: 10 lines <=> True",
            cues={"line_parity": line_parity_cue, "z_present": z_cue}, targets={"misleading-z": "z_present"})
