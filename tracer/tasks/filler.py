"""Filler text from installed sources only: Python's standard-library docstrings and wonderwords' word lists."""

from __future__ import annotations

import importlib
import inspect
import re
import warnings
from functools import lru_cache
from importlib.resources import files

# modules whose docstrings read as prose; the order fixes the pool, so it is part of the task definition
_DOC_MODULES = (
    "abc", "argparse", "asyncio", "base64", "bisect", "calendar", "cmd", "codecs", "collections", "configparser",
    "contextlib", "copy", "csv", "dataclasses", "datetime", "decimal", "difflib", "email.message", "enum",
    "fractions", "ftplib", "functools", "getopt", "gettext", "glob", "gzip", "hashlib", "heapq", "hmac",
    "html.parser", "http.client", "http.cookiejar", "imaplib", "inspect", "io", "ipaddress", "itertools",
    "json", "locale", "logging", "mailbox", "mimetypes", "numbers", "operator", "optparse", "os", "pathlib",
    "pdb", "pickletools", "pprint", "pydoc", "queue", "random", "re", "sched", "secrets", "selectors",
    "shlex", "shutil", "smtplib", "socket", "socketserver", "sqlite3", "ssl", "statistics", "string",
    "subprocess", "tarfile", "tempfile", "textwrap", "threading", "timeit", "tokenize", "trace", "traceback",
    "types", "typing", "unittest", "urllib.parse", "urllib.request", "uuid", "warnings", "weakref",
    "xml.dom.minidom", "zipfile", "zoneinfo",
)
_SENTENCE_END = re.compile(r"(?<=[a-z][.!?])\s+(?=[A-Z])")
_PROSE = re.compile(r"^[A-Z][A-Za-z ,;'\-]+[a-z][.!?]$")


def _docstrings(module) -> list[str]:
    """The docstrings of a module and of its public classes, functions and methods, in a fixed order."""
    docs = [inspect.getdoc(module) or ""]
    for name in sorted(vars(module)):
        obj = getattr(module, name)
        if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
            continue
        docs.append(inspect.getdoc(obj) or "")
        if inspect.isclass(obj):
            for attr in sorted(vars(obj)):
                if not attr.startswith("_"):
                    docs.append(inspect.getdoc(vars(obj)[attr]) or "")
    return docs


@lru_cache(maxsize=1)
def prose_sentences() -> tuple[str, ...]:
    """Distinct plain-prose sentences (no code, digits or symbols) from the standard library's docstrings."""
    seen: dict[str, None] = {}
    for mod_name in _DOC_MODULES:
        try:
            module = importlib.import_module(mod_name)
        except ImportError:
            continue
        with warnings.catch_warnings():  # reading deprecated members (typing.io, ...) warns
            warnings.simplefilter("ignore", DeprecationWarning)
            docs = _docstrings(module)
        for doc in docs:
            for paragraph in doc.split("\n\n"):
                text = " ".join(paragraph.split())
                for sentence in _SENTENCE_END.split(text):
                    if 40 <= len(sentence) <= 240 and _PROSE.match(sentence):
                        seen.setdefault(sentence, None)
    return tuple(seen)


def _word_list(name: str) -> list[str]:
    return files("wonderwords.assets").joinpath(name).read_text().split("\n")


@lru_cache(maxsize=1)
def words() -> dict[str, tuple[str, ...]]:
    """wonderwords' nouns, adjectives and verbs: single lowercase alphabetic words, profanities removed."""
    banned = {w.strip().lower() for w in _word_list("profanitylist.txt")}
    out = {}
    for kind, name in (("nouns", "nounlist.txt"), ("adjectives", "adjectivelist.txt"), ("verbs", "verblist.txt")):
        clean = (w.strip() for w in _word_list(name))
        out[kind] = tuple(sorted({w for w in clean if w.isalpha() and w.islower() and 3 <= len(w) <= 10
                                  and w not in banned}))
    return out
