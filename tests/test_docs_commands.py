"""Every command line the documentation shows parses with the command's real parser.

The pages are README.md, docs/*.md and export/README.md, and the module docstring of
every command (its --help text: kdml/train.py, kdml/<package>/__main__.py, the kit;
lines indented by 4 spaces are code there). A command line is any
`python -m kdml.<command> ...` (also `.venv/bin/python`, `python3`),
`python export/kdml_litert.py ...` or `python tools/<tool>.py ...` inside a code block
or inline code, with its backslash-continued lines joined; a `make <target>` names a
target of the Makefile.

How a line is read:
- `[optional]` parts are expanded both ways (without any, and with all of them);
  `a|b` alternatives (`[--search_gallery=float16|int8]`, `build|query|evaluate`)
  give one variant per alternative.
- `<placeholder>` stands for a value: a string flag takes it as it is, a typed flag
  (integer, float, enum, bool) gets a plausible value of its type instead.
- `...` (the flags shown above) and inline code are fragments: required flags may
  be missing, everything that is there must still parse.
- `make <target> VAR=value` runs the target's recipe with those variables: the kdml
  commands of the recipe are parsed as well (e.g. `make train TRAIN_ARGS="..."`).

Each variant runs through what the command's `__main__` runs before any work: for the
absl commands (kdml.train, kdml.evaluate, kdml.export) `command_line.absl_flags_parser`
(the `--output` spelling check, then absl's parsing, then no stray positional argument;
for kdml.train also the `TrainConfig` and method checks of its `main`); for the
argparse ones (kdml.index, kdml.benchmark, the kit) their `main` up to `parse_args`
(the spelling check, then argparse), flags spelled in full (argparse would take an
abbreviation); for a tool its absl flags, or its `main` up to `parse_args`. All of it
happens in one subprocess: absl programs define their flags on absl's global `FLAGS`,
one program at a time (this also keeps the flags of the test process untouched).
Nothing is built or trained.
"""

import argparse
import ast
import contextlib
import dataclasses
import glob
import importlib
import io
import json
import os
import re
import shlex
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = sorted([os.path.join(ROOT, "README.md"), os.path.join(ROOT, "export", "README.md")]
               + glob.glob(os.path.join(ROOT, "docs", "*.md")))
KIT = "export/kdml_litert.py"
# The commands' own files: their module docstring is their --help text.
PROGRAMS = sorted(path for path in glob.glob(os.path.join(ROOT, "kdml", "*.py"))
                  + glob.glob(os.path.join(ROOT, "kdml", "*", "__main__.py"))
                  + [os.path.join(ROOT, KIT)]
                  if 'if __name__ == "__main__"' in open(path, encoding="utf-8").read())
PLACEHOLDER = "<P>"  # what a `<placeholder>` of the docs becomes before parsing
# A command: the interpreter (any path, python or python3), then `-m kdml.<module>` or the kit.
_COMMAND = re.compile(r"(?:(?<=[\s`\"'(=])|^)(?:[\w./-]*/)?python3?\s+"
                      r"(?:-m\s+(kdml(?:\.\w+)+)|((?:[\w./-]*/)?kdml_litert\.py)"
                      r"|(tools/\w+\.py))(?=[\s`]|$)")
_MAKE = re.compile(r"(?:(?<=[;&|(`])|^)\s*(?:\$\s+)?make(?=\s|$)((?:\s+[^\s;&|#`]+)*)")
_FENCE = re.compile(r"^ {0,3}(```|~~~)[^\n]*\n(.*?)^ {0,3}\1[ \t]*$", re.S | re.M)
_INLINE = re.compile(r"(`+)(.+?)\1", re.S)
_SHELL_STOP = {"|", "||", "&", "&&", ";", ">", ">>", "2>", "2>&1", "<", ")", "}", "then", "do"}


@dataclasses.dataclass(frozen=True)
class DocCommand:
    """One variant of one documented command line."""

    page: str          # relative to the repository root
    line: int          # 1-based line where the command starts
    text: str          # the command as the page shows it (joined)
    program: str       # "kdml.<module>", "kit" or "tools/<name>.py"
    args: tuple        # its arguments (placeholders as PLACEHOLDER)
    fragment: bool     # inline code or `...`: required flags may be missing
    source: str = ""   # "make <target>" when the line came from a Makefile recipe

    @property
    def where(self) -> str:
        return f"{self.page}:{self.line}"

    @property
    def id(self) -> str:
        return f"{self.where} {self.program} {' '.join(self.args)}"[:150]


# -- reading the pages ---------------------------------------------------------------


def code_snippets(text):
    """(line, code, in_block) of every code block line (continuations joined) and every
    inline code span (its newlines as spaces) of a markdown page."""
    snippets, blanked = [], text
    for match in _FENCE.finditer(text):
        first = text.count("\n", 0, match.start(2)) + 1
        lines = match.group(2).split("\n")
        i = 0
        while i < len(lines):
            start, joined = i, lines[i]
            comment = "#" in joined.split("python", 1)[0] if "python" in joined else False
            while joined.rstrip().endswith("\\") and i + 1 < len(lines):
                i += 1
                following = lines[i].strip()
                if comment and following.startswith("#"):  # a commented command's continuation
                    following = following[1:].strip()
                joined = joined.rstrip()[:-1].rstrip() + " " + following
            snippets.append((first + start, joined, True))
            i += 1
        body = match.group(0)
        blanked = blanked.replace(body, re.sub(r"[^\n]", " ", body), 1)
    for match in _INLINE.finditer(blanked):
        line = blanked.count("\n", 0, match.start()) + 1
        snippets.append((line, " ".join(match.group(2).split()), False))
    return sorted(snippets)


def docstring_snippets(path):
    """(line, code, in_block) of a Python file's module docstring: lines indented by 4 or
    more spaces are code (continued by a backslash or by lines indented deeper), the others
    prose with inline code."""
    module = ast.parse(open(path, encoding="utf-8").read())
    docstring = ast.get_docstring(module, clean=False) if module.body else None
    if not docstring:
        return []
    first, lines, snippets, i = module.body[0].lineno, docstring.split("\n"), [], 0
    while i < len(lines):
        start, text = i, lines[i]
        if text.startswith("    "):
            indent = len(text) - len(text.lstrip())
            while i + 1 < len(lines) and (text.rstrip().endswith("\\") or (
                    lines[i + 1].strip() and len(lines[i + 1]) - len(lines[i + 1].lstrip())
                    > indent)):  # a continuation: after a backslash, or indented deeper
                i += 1
                text = text.rstrip().rstrip("\\").rstrip() + " " + lines[i].strip()
            snippets.append((first + start, text, True))
        else:
            snippets += [(first + i, " ".join(m.group(2).split()), False)
                         for m in _INLINE.finditer(text)]
        i += 1
    return snippets


def _tokens(text, in_block):
    """Shell words of `text` up to a comment or a shell operator; `<placeholder>`s become
    PLACEHOLDER (they may hold spaces and `|`)."""
    text = re.sub(r"<[^<>\n]*>", PLACEHOLDER, text)
    try:
        lexer = shlex.shlex(text, posix=True)
        lexer.whitespace_split, lexer.commenters = True, "#"
        words = list(lexer)
    except ValueError:  # an unbalanced quote in prose
        words = text.split()
    out, depth = [], 0
    for i, word in enumerate(words):
        if word == "|" and depth > 0:  # [a | b]: alternatives of an optional part
            out.append(word)
            continue
        if word in _SHELL_STOP:
            # inline `python -m kdml.benchmark run | report`: alternatives, not a pipe
            if (word == "|" and not in_block and len(out) == 1 and i + 1 < len(words)
                    and not words[i + 1].startswith("-")):
                out[0] += "|"
                continue
            break
        if out and out[-1].endswith("|") and out[-1] != "|" and not out[-1].startswith("-"):
            out[-1] += word
            continue
        out.append(word)
        opens, closes, _ = _brackets(word)
        depth = max(0, depth + opens - closes)
    return out


def _brackets(word):
    """(groups `word` opens, groups it closes, the word without those brackets): leading
    `[`s open, trailing `]`s close unless they close a `[` inside the word
    (`--data=<root>[,<root>...]`)."""
    opens = len(word) - len(word.lstrip("["))
    closes = len(word) - len(word.rstrip("]"))
    if opens == len(word):
        return opens, 0, ""
    inner = word[opens:len(word) - closes]
    closes -= min(closes, max(0, inner.count("[") - inner.count("]")))
    return opens, closes, word[opens:len(word) - closes]


def _groups(words):
    """Nested structure of `[optional]` parts: a list of words and lists (a list is one
    optional group; a word `|` inside a group separates its alternatives)."""
    root, stack = [], []
    stack.append(root)
    for word in words:
        opens, closes, word = _brackets(word)
        for _ in range(opens):
            group = []
            stack[-1].append(group)
            stack.append(group)
        if word:
            stack[-1].append(word)
        for _ in range(min(closes, len(stack) - 1)):
            stack.pop()
    return root


def _alternatives(word):
    """`--flag=a|b` -> [--flag=a, --flag=b]; `build|query` -> [build, query]."""
    name, eq, value = word.rpartition("=") if word.startswith("-") else ("", "", word)
    if "|" not in value or value.strip("|") != value:
        return [word]
    return [f"{name}{eq}{v}" for v in value.split("|")]


def _expand(items, include, choice):
    out = []
    for item in items:
        if isinstance(item, list):
            if include:
                options, current = [], []
                for word in item:
                    if word == "|":
                        options.append(current)
                        current = []
                    else:
                        current.append(word)
                options.append(current)
                out += _expand(options[min(choice, len(options) - 1)], include, choice)
        else:
            options = _alternatives(item)
            out.append(options[min(choice, len(options) - 1)])
    return out


def _width(items):
    """The most alternatives any part of `items` offers."""
    width = 1
    for item in items:
        if isinstance(item, list):
            width = max(width, item.count("|") + 1, _width(item))
        else:
            width = max(width, len(_alternatives(item)))
    return width


def variants(words):
    """Every argument list `words` stands for: optional parts left out and put in, and
    each alternative once. (tuple of words, fragment) pairs; `...` makes a fragment."""
    tree, out = _groups(words), []
    for include in (False, True):
        for choice in range(_width(tree)):
            args = _expand(tree, include, choice)
            fragment = any(a in ("...", "…") for a in args)
            entry = (tuple(a for a in args if a not in ("...", "…")), fragment)
            if entry not in out:
                out.append(entry)
    return out


def commands_in(page, line, code, in_block):
    """The DocCommands of one code snippet: kdml commands and the kit."""
    found = []
    for match in _COMMAND.finditer(code):
        module, _, tool = match.groups()
        program = module or tool or "kit"
        rest, text, inline = code[match.end():], code[match.start():], not in_block
        if match.start() and code[match.start() - 1] == "`":  # `...` in a code comment
            rest, inline = rest.split("`", 1)[0], True
            text = text.split("`", 1)[0]
        for args, fragment in variants(_tokens(rest, not inline)):
            found.append(DocCommand(page, line, " ".join(text.split()), program, args,
                                    fragment or inline or not args))
    return found


def make_lines(code):
    """[(target, {variable: value})] of every `make ...` command of a snippet."""
    found = []
    for match in _MAKE.finditer(code):
        targets, variables = [], {}
        for word in _tokens(match.group(1), True):
            if "=" in word:
                name, _, value = word.partition("=")
                variables[name] = value
            elif not word.startswith("-") and PLACEHOLDER not in word:  # `make <target>`
                targets.append(word)
        found += [(target, variables) for target in targets]  # a bare `make`: the tool
    return found


def makefile():
    """(targets -> recipe command lines, variable defaults) of the Makefile."""
    recipes, defaults, target = {}, {}, None
    lines = open(os.path.join(ROOT, "Makefile"), encoding="utf-8").read().split("\n")
    i = 0
    while i < len(lines):
        line = lines[i]
        while line.endswith("\\") and i + 1 < len(lines):
            i += 1
            line = line[:-1] + " " + lines[i].strip()
        i += 1
        if line.startswith("\t") and target:
            for name in target:
                recipes[name].append(line.strip())
            continue
        assignment = re.match(r"^([A-Za-z_]\w*)\s*(?:\?=|:=|=)\s*(.*)$", line)
        rule = re.match(r"^([^\s:#=][^:=#]*?)\s*:(?!=)", line)
        if assignment:
            defaults[assignment.group(1)] = assignment.group(2).strip()
            target = None
        elif rule:
            names = [n for n in rule.group(1).split() if not n.startswith(("$", "."))]
            target = names or None
            for name in names:
                recipes.setdefault(name, [])
        elif line.strip() and not line.startswith("#"):
            target = None
    return recipes, defaults


def _substitute(text, variables):
    def value(match):
        name = match.group(1)
        return _substitute(variables.get(name, ""), variables)  # make: undefined is empty
    return re.sub(r"\$\((\w+)\)", value, text)


def collect():
    """(DocCommands, make references [(page, line, text, target, variables)])."""
    commands, makes, seen = [], [], set()
    recipes, defaults = makefile()
    for path in PAGES + PROGRAMS:
        page = os.path.relpath(path, ROOT)
        snippets = (docstring_snippets(path) if path.endswith(".py")
                    else code_snippets(open(path, encoding="utf-8").read()))
        for line, code, in_block in snippets:
            commands += commands_in(page, line, code, in_block)
            for target, variables in make_lines(code):
                makes.append((page, line, code, target, variables))
                if (target, tuple(sorted(variables.items()))) in seen:
                    continue  # the recipe's commands are checked once per variable set
                seen.add((target, tuple(sorted(variables.items()))))
                for recipe in recipes.get(target, []):
                    text = _substitute(recipe, {**defaults, **variables})
                    commands += [dataclasses.replace(c, source=f"make {target}")
                                 for c in commands_in(page, line, text, True)]
    return commands, makes


COMMANDS, MAKE_REFERENCES = collect()
COMMAND_LINES = sorted({(c.where, c.text, c.source) for c in COMMANDS})


# -- parsing, in the subprocess --------------------------------------------------------


class _Parsed(BaseException):  # not an Exception: a command's `except` does not catch it
    """Raised by the patched `ArgumentParser.parse_known_args` once the top parser has
    parsed (before the command does anything)."""

    def __init__(self, parser, namespace, extras):
        super().__init__()
        self.parser, self.namespace, self.extras = parser, namespace, extras


def _plausible(kind, choices, value):
    """A value of the flag's type for a placeholder value (`<n>`, `...`)."""
    if PLACEHOLDER not in value and value not in ("...", "…"):
        return value
    if choices:
        return str(list(choices)[0])
    return {"int": "1", "float": "0.5", "bool": "true"}.get(kind, value.replace(
        PLACEHOLDER, "x").replace("...", "x"))


def _absl_kind(flag):
    from absl import flags

    parser = flag.parser
    if isinstance(parser, flags.EnumParser):
        return "enum", parser.enum_values
    if isinstance(parser, flags.BooleanParser):
        return "bool", None
    if isinstance(parser, flags.IntegerParser):
        return "int", None
    if isinstance(parser, flags.FloatParser):
        return "float", None
    return "string", None


def _fill_absl(args, flag_values):
    out = []
    for arg in args:
        if arg.startswith("-") and "=" in arg:
            name, _, value = arg.lstrip("-").partition("=")
            if name in flag_values:
                kind, choices = _absl_kind(flag_values[name])
                arg = f"{arg.split('=', 1)[0]}={_plausible(kind, choices, value)}"
        elif not arg.startswith("-"):
            arg = _plausible("string", None, arg)
        out.append(arg)
    return out


def _parse_absl(program, module, args, fragment):
    """The error of `args` under an absl command's parser ('' when it parses): a kdml
    command's `absl_flags_parser`, a tool's plain `app.run` parsing."""
    from absl import app, flags

    from kdml import command_line

    values = flags.FLAGS
    if program.startswith("tools/"):
        prog, parse = f"python {program}", app.parse_flags_with_usage
    else:
        prog = getattr(module, "PROG", f"python -m {program}")
        parse = command_line.absl_flags_parser(prog)
    # a placeholder stands for a value the checks after parsing cannot judge
    placeholders = any(PLACEHOLDER in a or a.endswith(("=...", "=…")) for a in args)
    args = _fill_absl(args, values)
    helps = [a for a in args if a.lstrip("-").split("=")[0] in ("help", "helpfull", "helpshort",
                                                                 "helpxml", "?")]
    for arg in helps:
        if arg.lstrip("-").split("=")[0] not in values:
            return f"{arg} is not a flag of {prog}"
    args = [a for a in args if a not in helps]
    saved = {}
    if fragment or helps:  # required flags may be missing
        for name in list(values):
            saved[name] = values[name].validators
            values[name].validators = []
    values.unparse_flags()
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            rest = parse([prog, *args])
        if len(rest) > 1:
            return f"{prog} takes no positional arguments: {' '.join(rest[1:])}"
        if program == "kdml.train" and not fragment and not placeholders:
            from kdml.methods import check_method_options, get_method

            config = module.config_from_flags(values)
            get_method(config.method)
            check_method_options(config)
        return ""
    except SystemExit as exit_:
        said = [line for line in stderr.getvalue().splitlines() if line.strip()]
        return f"exit code {exit_.code}: " + (said[0] if said else "")
    except Exception as error:  # noqa: BLE001  (reported as the line's failure)
        return f"{type(error).__name__}: {error}"
    finally:
        for name, validators in saved.items():
            values[name].validators = validators
        values.unparse_flags()


def _subparsers(parser):
    return [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]


def _chosen(parser, args):
    """The parser and the subparsers `args` choose (top first)."""
    chain = [parser]
    for action in _subparsers(parser):
        word = next((a for a in args if not a.startswith("-")), None)
        if word in action.choices:
            chain += _chosen(action.choices[word], args[args.index(word) + 1:])
    return chain


def _option(chain, name):
    for parser in chain:
        for action in parser._actions:
            if name in action.option_strings:
                return action
    return None


def _fill_argparse(parser, args):
    chain, out = _chosen(parser, args), []
    for arg in args:
        if arg.startswith("-") and "=" in arg:
            name, _, value = arg.partition("=")
            action = _option(chain, name)
            if action is not None:
                kind = {int: "int", float: "float"}.get(action.type, "string")
                arg = f"{name}={_plausible(kind, action.choices, value)}"
        elif not arg.startswith("-"):
            arg = _plausible("string", None, arg)
        out.append(arg)
    return out, chain


def _not_required(parser):
    for action in parser._actions:
        action.required = False
        for sub in getattr(action, "choices", None) or {}:
            if isinstance(action, argparse._SubParsersAction):
                _not_required(action.choices[sub])


def _parse_argparse(main, args, fragment):
    """The error of `args` under an argparse command's `main` ('' when it parses): `main`
    runs up to its parser's `parse_args` (or `parse_known_args`), which stops it."""
    original = argparse.ArgumentParser.parse_known_args
    state = {"depth": 0}

    def parse_known_args(self, argv=None, namespace=None):
        if state["depth"]:  # a subcommand's parser, inside the top one
            return original(self, argv, namespace)
        state["depth"] += 1
        if fragment:
            _not_required(self)
        argv = sys.argv[1:] if argv is None else list(argv)
        state["args"], state["chain"] = _fill_argparse(self, argv)
        raise _Parsed(self, *original(self, state["args"], namespace))

    stderr = io.StringIO()
    argparse.ArgumentParser.parse_known_args = parse_known_args
    try:
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            main(list(args))
        return "the command ran past its argument parsing"
    except _Parsed as parsed:
        if parsed.extras:
            return f"{parsed.parser.prog}: error: unrecognized arguments: {' '.join(parsed.extras)}"
        for arg in state["args"]:
            if arg == "--":
                break
            name = arg.split("=", 1)[0]
            if name.startswith("--") and _option(state["chain"], name) is None:
                return f"{name} is an abbreviation: spell the flag in full"
        return _check_argparse_values(parsed.namespace)
    except SystemExit as exit_:
        if exit_.code == 0:  # --help
            return ""
        return stderr.getvalue().strip().splitlines()[-1] if stderr.getvalue() else (
            f"exit code {exit_.code}")
    finally:
        argparse.ArgumentParser.parse_known_args = original


def _check_argparse_values(namespace):
    """What `kdml.benchmark run` checks right after parsing: a known preset and rows."""
    if getattr(namespace, "command", "") == "run" and getattr(namespace, "preset", None):
        from kdml.benchmark.presets import PRESETS

        if namespace.preset not in PRESETS:
            return f"--preset={namespace.preset} is not a preset ({', '.join(PRESETS)})"
        rows = [m for m in (namespace.methods or "").split(",") if m]
        unknown = [m for m in rows if m not in PRESETS[namespace.preset].methods]
        if unknown:
            return f"--methods: {unknown} are not rows of preset {namespace.preset}"
    return ""


def _program(program):
    """(kind, how to load it) of a documented program: kind "absl", "argparse" or None
    (no such command, or a tool with neither parser)."""
    if program == "kit":
        path = os.path.join(ROOT, KIT)
    elif program.startswith("tools/"):
        path = os.path.join(ROOT, program)
    else:
        package = os.path.join(ROOT, *program.split("."))
        path = (os.path.join(package, "__main__.py") if os.path.isdir(package)
                else package + ".py")
    if not os.path.isfile(path):
        return None, path
    source = open(path, encoding="utf-8").read()
    if 'if __name__ == "__main__"' not in source:
        return None, path
    if "app.run(" in source:
        return "absl", path
    return ("argparse" if "argparse" in source else None), path


def _load(program, path):
    """The module of `program` without running its `__main__` block: a kdml command is
    imported, the kit and a tool are run under another name (`runpy`)."""
    import runpy
    import types

    if program.startswith("kdml."):
        name = program + (".__main__" if path.endswith("__main__.py") else "")
        return importlib.import_module(name), name
    name = "docs_" + os.path.splitext(os.path.basename(path))[0]
    if os.path.dirname(path) not in sys.path:  # as `python tools/x.py` puts tools/ first
        sys.path.insert(0, os.path.dirname(path))
    return types.SimpleNamespace(**runpy.run_path(path, run_name=name)), name


def _main_of(module, path):
    """`main(argv)` of an argparse program (a `main()` reading sys.argv gets it there)."""
    import inspect

    main = module.main
    if inspect.signature(main).parameters:
        return main

    def with_argv(argv):
        saved, sys.argv = sys.argv, [path, *argv]
        try:
            return main()
        finally:
            sys.argv = saved
    return with_argv


def parse_all(entries):
    """{id: error ('' when it parses)} of [{"id", "program", "args", "fragment"}], absl
    programs one module at a time (each module's flags removed before the next)."""
    from absl import app, flags

    results, by_program = {}, {}
    for entry in entries:
        by_program.setdefault(entry["program"], []).append(entry)
    kinds = {program: _program(program) for program in by_program}
    # the absl programs first: an argparse one may import an absl one, whose flags would
    # then stay defined beside the next absl program's (absl allows one definition per name)
    for program in sorted(by_program, key=lambda p: (kinds[p][0] != "absl", p)):
        group, (kind, path) = by_program[program], kinds[program]
        if kind is None:
            missing = not os.path.isfile(path) or program.startswith("kdml.")
            for entry in group:
                results[entry["id"]] = (f"there is no command {program}" if missing else "")
            continue
        module, name = _load(program, path)
        if kind == "absl":
            app.define_help_flags()
            for entry in group:
                results[entry["id"]] = _parse_absl(program, module, entry["args"],
                                                   entry["fragment"])
            for flag in flags.FLAGS.get_flags_for_module(name):
                delattr(flags.FLAGS, flag.name)
        else:
            for entry in group:
                results[entry["id"]] = _parse_argparse(_main_of(module, path), entry["args"],
                                                       entry["fragment"])
    return results


# Hand-written lines the checker must judge as the commands do: (program, args, fragment,
# the error's words; "" when the line must parse). They run in the same subprocess.
CHECKS = [
    ("kdml.train", ["--method=so_proxy", "--epochs=3"], False, ""),
    ("kdml.train", ["--method=<P>", "--epochs=<P>", "--nomixed_precision"], False, ""),
    ("kdml.train", ["--method=no_such_method"], False, "Unknown method 'no_such_method'"),
    ("kdml.train", ["--data_kind=no_such_kind"], False, "exit code 2"),
    ("kdml.train", ["--no_such_flag=1"], False, "exit code 2"),
    ("kdml.train", ["--epochs=many"], False, "exit code 2"),
    ("kdml.train", ["--output=runs/x"], False, "exit code 2"),
    ("kdml.train", ["--method=proxy_anchor", "--xbm_size=100"], False, "--xbm_size wraps"),
    ("kdml.train", ["--epochs=3", "stray"], False, "no positional arguments"),
    ("kdml.train", ["--helpfull"], False, ""),
    ("kdml.evaluate", ["--dataset=synthetic"], False, "exit code 2"),  # --model is required
    ("kdml.evaluate", ["--dataset=synthetic"], True, ""),              # ... unless a fragment
    ("kdml.evaluate", ["--model=m.keras", "--protocol=no_such"], True, "exit code 2"),
    ("kdml.export", ["--model=m.keras", "--search_gallery=int4"], False, "exit code 2"),
    ("kdml.index", ["build", "--model=m", "--source=synthetic", "--output_dir=g"], False, ""),
    ("kdml.index", ["build", "--model=m", "--source=synthetic"], False, "required"),
    ("kdml.index", ["build", "--source=synthetic"], True, ""),
    ("kdml.index", ["build", "--backend=annoy"], True, "invalid choice"),
    ("kdml.index", ["build", "--output=g"], True, "use --output_dir"),
    ("kdml.index", ["build", "--output_d=g"], True, "abbreviation"),
    ("kdml.index", ["query", "--k=<P>", "--no_such"], True, "unrecognized arguments"),
    ("kdml.index", ["evaluate", "--index=g", "--k=<P>"], False, ""),
    ("kdml.benchmark", ["run", "--preset=no_such", "--omniglot_dir=d"], False, "not a preset"),
    ("kdml.benchmark", ["run", "--methods=pddm,no_row", "--omniglot_dir=d"], False, "not rows"),
    ("kdml.benchmark", ["report", "<P>", "--compact"], False, ""),
    ("kdml.no_such_command", [], True, "there is no command"),
    ("tools/bench_speed.py", ["--steps=5", "--crt_only"], False, ""),           # absl tool
    ("tools/bench_speed.py", ["--no_such_flag"], False, "Unknown command line flag"),
    ("tools/bench_index.py", ["--configs=ivf", "--queries=<P>"], False, ""),     # argparse
    ("tools/bench_index.py", ["--no_such_flag"], False, "unrecognized arguments"),
    ("tools/bench_eval.py", ["--repeats=x"], False, "invalid int value"),         # main()
    ("tools/no_such_tool.py", [], False, "there is no command"),
    ("kit", ["embed", "--model=...", "--output=e.npy", "a.jpg"], False, ""),
    ("kit", ["embed", "--model=m", "--output_dir=e"], False, "required"),
    ("kit", ["search", "--model=m", "--top=5", "q.jpg"], False, "unrecognized arguments"),
]


@pytest.fixture(scope="module")
def parse_results():
    entries = [{"id": str(i), "program": c.program, "args": list(c.args), "fragment": c.fragment}
               for i, c in enumerate(COMMANDS)]
    entries += [{"id": f"check{i}", "program": program, "args": args, "fragment": fragment}
                for i, (program, args, fragment, _) in enumerate(CHECKS)]
    script = ("import json, sys\nfrom tests.test_docs_commands import parse_all\n"
              "print('RESULTS ' + json.dumps(parse_all(json.loads(sys.stdin.read()))))")
    env = {**os.environ, "PYTHONPATH": ROOT, "TF_CPP_MIN_LOG_LEVEL": "3"}
    result = subprocess.run([sys.executable, "-c", script], input=json.dumps(entries),
                            capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    lines = [l for l in result.stdout.splitlines() if l.startswith("RESULTS ")]
    assert result.returncode == 0 and lines, result.stderr[-3000:]
    return json.loads(lines[-1][len("RESULTS "):])


# -- the tests -------------------------------------------------------------------------


def test_the_pages_show_many_command_lines():
    """A floor on what is found: a broken collector finds nothing and passes everything."""
    programs = {c.program for c in COMMANDS}
    print(f"{len(COMMAND_LINES)} documented command lines ({len(COMMANDS)} variants, "
          f"{len(MAKE_REFERENCES)} make references) in {len(PAGES)} pages")
    assert len(COMMAND_LINES) >= 60
    assert {"kdml.train", "kdml.evaluate", "kdml.export", "kdml.index", "kdml.benchmark",
            "kit"} <= programs
    assert len(MAKE_REFERENCES) >= 10


@pytest.mark.parametrize("number", range(len(COMMANDS)), ids=[c.id for c in COMMANDS])
def test_documented_command_parses(number, parse_results):
    command = COMMANDS[number]
    error = parse_results[str(number)]
    origin = f" (through {command.source} of the Makefile)" if command.source else ""
    assert not error, (f"{command.where}: `{command.text}`{origin} does not parse as "
                       f"`{command.program} {' '.join(command.args)}`: {error}")


@pytest.mark.parametrize("reference", MAKE_REFERENCES, ids=lambda r: f"{r[0]}:{r[1]} make {r[3]}")
def test_documented_make_target_exists(reference):
    page, line, code, target, _ = reference
    recipes, _ = makefile()
    assert target in recipes, (f"{page}:{line}: `{code.strip()}` names make target {target!r}, "
                               f"which the Makefile does not define ({', '.join(sorted(recipes))})")


# -- the reader and the checker themselves, on hand-written lines ------------------------


@pytest.mark.parametrize("number", range(len(CHECKS)),
                         ids=[f"{c[0]} {' '.join(c[1])}" for c in CHECKS])
def test_checker_judges_hand_written_lines_as_the_commands_do(number, parse_results):
    program, args, fragment, expected = CHECKS[number]
    error = parse_results[f"check{number}"]
    if expected:
        assert expected in error, (program, args, error)
    else:
        assert error == "", (program, args, error)


def test_reader_joins_continuations_and_expands_optional_parts():
    page = ("```bash\n"
            "python -m kdml.index build --model=m.keras \\\n"
            "    --source=folder:g/ --output_dir=g.index [--backend=faiss [--nprobe=<n>]]\n"
            "# = python -m kdml.benchmark run --preset=omniglot \\\n"
            "#       --results_dir=r   # a comment\n"
            "```\n"
            "Inline `python -m kdml.benchmark run | report` and `make train`.\n")
    snippets = code_snippets(page)
    found = [c for line, code, block in snippets for c in commands_in("p", line, code, block)]
    assert [(c.line, c.program, c.args, c.fragment) for c in found] == [
        (2, "kdml.index", ("build", "--model=m.keras", "--source=folder:g/",
                           "--output_dir=g.index"), False),
        (2, "kdml.index", ("build", "--model=m.keras", "--source=folder:g/",
                           "--output_dir=g.index", "--backend=faiss", f"--nprobe={PLACEHOLDER}"),
         False),
        (4, "kdml.benchmark", ("run", "--preset=omniglot", "--results_dir=r"), False),
        (7, "kdml.benchmark", ("run",), True),
        (7, "kdml.benchmark", ("report",), True),
    ]
    assert [make_lines(code) for _, code, block in snippets if "make" in code] == [
        [("train", {})]]


def test_reader_reads_a_docstring_as_help_text(tmp_path):
    path = tmp_path / "command.py"
    path.write_text('"""`python -m kdml.index build`: builds.\n\n'
                    "    python -m kdml.benchmark report <dir>\n"
                    "        [--compact]   # `python -m kdml.train` in a comment\n"
                    '"""\n')
    found = [c for line, code, block in docstring_snippets(str(path))
             for c in commands_in("p", line, code, block)]
    assert [(c.line, c.program, c.args, c.fragment) for c in found] == [
        (1, "kdml.index", ("build",), True),
        (3, "kdml.benchmark", ("report", PLACEHOLDER), False),
        (3, "kdml.benchmark", ("report", PLACEHOLDER, "--compact"), False),
        (3, "kdml.train", (), True),
    ]


def test_reader_gives_each_alternative_and_drops_ellipsis():
    assert variants(["build", "...", "[--search_gallery=float16|int8]", "[--k=5]"]) == [
        (("build",), True),
        (("build", "--search_gallery=float16", "--k=5"), True),
        (("build", "--search_gallery=int8", "--k=5"), True),
    ]
    # a `|` inside [ ]: alternatives, not a pipe; a [ ] inside a value stays in the value
    words = _tokens("run --data=<root>[,<root>...] [--test_groups=A | --num_test_groups=2]",
                    True)
    assert [args for args, _ in variants(words)] == [
        ("run", f"--data={PLACEHOLDER}[,{PLACEHOLDER}...]"),
        ("run", f"--data={PLACEHOLDER}[,{PLACEHOLDER}...]", "--test_groups=A"),
        ("run", f"--data={PLACEHOLDER}[,{PLACEHOLDER}...]", "--num_test_groups=2"),
    ]
    assert _tokens('make train TRAIN_ARGS="--a=1 --b=2" && echo', True) == [
        "make", "train", "TRAIN_ARGS=--a=1 --b=2"]
    assert _tokens("--dataset=<a folder, with spaces> | tee log", True) == [
        f"--dataset={PLACEHOLDER}"]
