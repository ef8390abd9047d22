#!/usr/bin/env python3
"""What an embedder of libkdkit.so sees, checked against the public headers.

  abi_check.py SOURCE_DIR LIBKDKIT_SO KDKIT_BINARY PROJECT_VERSION LIBKDKIT_A

1. Every function declared in include/kdkit/*.h is marked KD_API (a
   declaration without it would be silently hidden by -fvisibility=hidden).
2. The shared library's dynamic symbol table defines exactly those
   functions: nothing internal (kdi_sys_open, a helper of one layer...), nothing
   missing (a declaration whose definition was dropped or renamed).  Names
   starting with "_" are the toolchain's (sanitizer runtimes, _init, _fini).
   Internal functions and data shared between the library's files (global,
   so in libkdkit.a, but not exported) all carry the internal prefix kdi_,
   and every exported name the public prefix kd_.
3. Every C function the Python binding (python/kdkit, ctypes) looks up is
   exported, so `import kdkit` cannot fail with an AttributeError on a
   library built from this tree.
4. Every public function returning a result code says in its comment which
   errors it can return (a KD_E* code, "Errors", or "Cannot fail"), and that
   list is complete for the codes its own body produces (returns, assigns,
   or passes to kd_err_set/kd_err_sys and the layers' fail helpers):
   KD_EINVAL and KD_ENOMEM excepted, which kdkit/error.h says any function
   may return.  Codes that come from a callee's result are not traced.
5. One version everywhere: KD_VERSION_* in kdkit/api.h, CMake's project
   version, `kdkit --version`, the shared library's file name, and the Python
   package's __version__ and pyproject.toml.

Prints each problem with the file it is in; exits 1 if there is any.
"""

import glob
import os
import re
import subprocess
import sys


def strip_comments_and_cpp(text):
    text = re.sub(r"/\*.*?\*/", lambda m: "\n" * m.group(0).count("\n"), text, flags=re.S)
    text = re.sub(r"//[^\n]*", "", text)
    out = []
    cont = False
    for line in text.split("\n"):
        if cont or line.lstrip().startswith("#"):
            cont = line.endswith("\\")
            out.append("")
            continue
        out.append(line)
    text = "\n".join(out)
    return text.replace('extern "C" {', "")


def header_declarations(path):
    """[(name, has_kd_api, line)] of the top-level function declarations."""
    text = strip_comments_and_cpp(open(path, encoding="utf-8").read())
    decls = []
    depth = 0
    stmt = []
    stmt_line = None
    line = 1
    for ch in text:
        if ch == "\n":
            line += 1
        if ch == "{":
            depth += 1
            continue
        if ch == "}":
            depth = max(0, depth - 1)
            continue
        if depth > 0:
            continue
        if ch == ";":
            s = " ".join("".join(stmt).split())
            stmt, start = [], stmt_line
            stmt_line = None
            if "(" not in s or s.startswith(("typedef", "_Static_assert", "static_assert")):
                continue
            words = s.split()
            if "static" in words:
                decls.append((None, False, start, "static function in a public header: " + s))
                continue
            m = re.match(r"(.*?)\b([A-Za-z_]\w*)\s*\(", s)
            if not m:
                decls.append((None, False, start, "cannot parse declaration: " + s))
                continue
            decls.append((m.group(2), re.search(r"\bKD_API\b", m.group(1)) is not None, start, s))
            continue
        if stmt_line is None and not ch.isspace():
            stmt_line = line
        stmt.append(ch)
    return decls


def undocumented_errors(path):
    """Names of KD_API functions returning int whose comment (the block above
    the declaration, or above the group of declarations it belongs to) names
    no error."""
    L = open(path, encoding="utf-8").read().split("\n")
    out = []
    for i, s in enumerate(L):
        if not s.startswith("KD_API") or i + 1 >= len(L):
            continue
        d = L[i + 1]
        m = re.match(r"(int|int64_t|ssize_t) +(kd_\w+)\(", d)
        if not m:
            continue
        j = i - 1
        block = []
        # skip up over the other declarations of a group, then take the comment
        while j >= 0 and (L[j].startswith("KD_API") or re.match(r"^[a-z].*[;,)]$", L[j]) or
                          L[j].startswith("    ")):
            j -= 1
        while j >= 0 and (L[j].strip().startswith(("/*", "*")) or L[j].strip().endswith("*/") or
                          L[j].startswith("   ")):
            block.append(L[j])
            j -= 1
        text = "\n".join(block)
        out.append((m.group(2), i + 2, text))
    return out


def documents_errors(text):
    return re.search(r"KD_E[A-Z]+|[Ee]rrors?\b|[Cc]annot fail|never fails", text) is not None


# A code the body produces: in a return statement, assigned (rc = KD_EIO),
# or in the arguments before the message of kd_err_set, kd_err_sys or a
# layer's *fail* helper (errno == ENOENT ? KD_ENOTFOUND : KD_EIO included);
# never a comparison with a callee's result (rc == KD_ENOTFOUND), nor a code
# handed to a report callback as a finding.
def produced(body):
    codes = set()
    for m in re.finditer(r"\breturn\b([^;]*);", body):
        codes.update(re.findall(r"(?<![=!]=\s)\b(KD_E[A-Z]+)\b(?!\s*[=!]=)", m.group(1)))
    codes.update(re.findall(r"\b\w+\s*(?<![=!<>])=\s*(KD_E[A-Z]+)\b\s*;", body))
    for m in re.finditer(r"\b(?:kd_err_set|kd_err_sys|\w*fail\w*)\s*\(([^\"]*)", body):
        codes.update(re.findall(r"(?<![=!]=\s)\b(KD_E[A-Z]+)\b(?!\s*[=!]=)", m.group(1)))
    return codes


ANY_FUNCTION_MAY = {"KD_EINVAL", "KD_ENOMEM"}


def definitions(src):
    """{name: (codes the body produces, file:line)} for the top-level
    int-returning kd_ functions in src/."""
    out = {}
    for f in sorted(glob.glob(os.path.join(src, "src", "**", "*.c"), recursive=True)):
        text = strip_comments_and_cpp(open(f, encoding="utf-8").read())
        # literals emptied, so a brace inside one cannot end a body early
        text = re.sub(r"'(?:\\.|[^'\\])'", "' '", re.sub(r'"(?:\\.|[^"\\\n])*"', '""', text))
        for m in re.finditer(r"^int\s+(kd_\w+)\s*\([^;{]*\)\s*\{", text, re.M):
            i, depth = m.end(), 1
            while depth and i < len(text):
                depth += {"{": 1, "}": -1}.get(text[i], 0)
                i += 1
            body = text[m.end():i]
            codes = {c for c in produced(body) if c in KD_CODES}
            out[m.group(1)] = (codes, "%s:%d" % (os.path.relpath(f, src),
                                                text.count("\n", 0, m.start()) + 1))
    return out


KD_CODES = set()


def exported(lib):
    out = subprocess.run(["nm", "-D", "--defined-only", lib], check=True,
                         capture_output=True, text=True).stdout
    syms = {}
    for row in out.splitlines():
        parts = row.split()
        if len(parts) >= 3:
            syms[parts[2].split("@")[0]] = parts[1]
    return {n: t for n, t in syms.items() if not n.startswith("_")}


def python_names(src):
    names = {}
    for py in sorted(glob.glob(os.path.join(src, "python", "kdkit", "*.py"))):
        text = open(py, encoding="utf-8").read()
        for m in re.finditer(r'_fn\(\s*"(\w+)"|\blib\.(kd_\w+)', text):
            names.setdefault(m.group(1) or m.group(2), os.path.relpath(py, src))
    return names


def main():
    src, lib, kdkit, project_version, static = sys.argv[1:6]
    problems = []

    declared = {}
    for h in sorted(glob.glob(os.path.join(src, "include", "kdkit", "*.h"))):
        rel = os.path.relpath(h, src)
        for name, has_api, line, s in header_declarations(h):
            if name is None:
                problems.append("%s:%s: %s" % (rel, line, s))
                continue
            if not has_api:
                problems.append("%s:%s: %s is declared without KD_API (hidden from libkdkit.so)"
                                % (rel, line, name))
            declared[name] = "%s:%s" % (rel, line)
    if len(declared) < 100:
        problems.append("only %d public declarations found: the header parser is broken"
                        % len(declared))

    err_h = open(os.path.join(src, "include", "kdkit", "error.h"), encoding="utf-8").read()
    KD_CODES.update(re.findall(r"^\s+(KD_E[A-Z]+) = -\d+", err_h, re.M))
    if len(KD_CODES) < 10:
        problems.append("only %d KD_E* codes found in kdkit/error.h: the scan is broken"
                        % len(KD_CODES))
    defs = definitions(src)
    checked = 0
    for h in sorted(glob.glob(os.path.join(src, "include", "kdkit", "*.h"))):
        rel = os.path.relpath(h, src)
        for name, line, text in undocumented_errors(h):
            if not documents_errors(text):
                problems.append("%s:%d: %s: its comment lists no error it can return (KD_E*, "
                                "\"Errors: ...\" or \"Cannot fail\")" % (rel, line, name))
                continue
            if name not in defs:
                continue
            checked += 1
            listed = set(re.findall(r"KD_E[A-Z]+", text))
            missing = sorted(defs[name][0] - listed - ANY_FUNCTION_MAY)
            if missing:
                problems.append("%s:%d: %s: its comment does not list %s, which its body (%s) "
                                "returns" % (rel, line, name, ", ".join(missing), defs[name][1]))
    if checked < 100:
        problems.append("only %d error lists compared with their definitions: the scan is broken"
                        % checked)

    syms = exported(lib)
    for name in sorted(set(syms) - set(declared)):
        problems.append("%s exports %s (nm type %s), which no public header declares KD_API"
                        % (lib, name, syms[name]))
    for name in sorted(set(declared) - set(syms)):
        problems.append("%s: %s is declared KD_API but %s does not export it"
                        % (declared[name], name, lib))

    out = subprocess.run(["nm", "--defined-only", "-g", static], check=True,
                         capture_output=True, text=True).stdout
    internal = set()
    for row in out.splitlines():
        parts = row.split()
        if len(parts) == 3 and not parts[2].startswith("_") and parts[2] not in syms:
            internal.add(parts[2])
    for name in sorted(n for n in internal if not n.startswith("kdi_")):
        problems.append("%s: internal symbol %s lacks the internal prefix kdi_ (docs/design.md)"
                        % (os.path.basename(static), name))
    for name in sorted(n for n in syms if not n.startswith("kd_")):
        problems.append("%s exports %s, which lacks the public prefix kd_" % (lib, name))

    py = python_names(src)
    if len(py) < 20:
        problems.append("only %d ctypes names found in python/kdkit: the scan is broken" % len(py))
    for name in sorted(py):
        if name not in syms:
            problems.append("%s looks up %s, which %s does not export" % (py[name], name, lib))

    api = open(os.path.join(src, "include", "kdkit", "api.h"), encoding="utf-8").read()
    parts = [re.search(r"#define KD_VERSION_%s (\d+)" % p, api) for p in ("MAJOR", "MINOR", "PATCH")]
    header_version = ".".join(m.group(1) for m in parts) if all(parts) else None
    if header_version != project_version:
        problems.append("kdkit/api.h says version %s, CMake's project version is %s"
                        % (header_version, project_version))
    cli = subprocess.run([kdkit, "--version"], capture_output=True, text=True)
    if cli.returncode != 0 or cli.stdout != "kdkit %s\n" % project_version:
        problems.append("`kdkit --version` printed %r (exit %d), expected 'kdkit %s'"
                        % (cli.stdout, cli.returncode, project_version))
    real = os.path.basename(os.path.realpath(lib))
    if real != "libkdkit.so.%s" % project_version:
        problems.append("the shared library is %s, expected libkdkit.so.%s" % (real, project_version))
    init = open(os.path.join(src, "python", "kdkit", "__init__.py"), encoding="utf-8").read()
    m = re.search(r'__version__ = "([^"]+)"', init)
    if not m or m.group(1) != project_version:
        problems.append("python/kdkit/__init__.py: __version__ %s, expected %s"
                        % (m.group(1) if m else "missing", project_version))
    toml = open(os.path.join(src, "python", "pyproject.toml"), encoding="utf-8").read()
    m = re.search(r'^version = "([^"]+)"', toml, re.M)
    if not m or m.group(1) != project_version:
        problems.append("python/pyproject.toml: version %s, expected %s"
                        % (m.group(1) if m else "missing", project_version))

    for p in problems:
        print("FAIL: " + p)
    print("%d public functions declared, %d exported, %d looked up by the Python binding; "
          "version %s; %d problem(s)" % (len(declared), len(syms), len(py), project_version,
                                          len(problems)))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
