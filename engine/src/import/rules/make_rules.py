#!/usr/bin/env python3
"""Writes gitleaks.json beside this file: gitleaks' default rules (v8.30.1) as the crate
keyspoor ships them, already translated to the syntax of Rust's `regex` crate, made compact.

    python3 make_rules.py ~/.cargo/registry/src/*/keyspoor-0.1.4/src/builtin_rules.json

keyspoor lists the same global allowlist in every rule; here it is written once (`global`), and
each rule keeps only its own. Path allowlists are left out: codelsi decides which files to read
itself (vendored, generated and lock files are skipped before any scan), and dropping them only
ever makes a rule stricter, never looser. An `and` group that names paths is dropped for that
reason too. So are the rules that apply to some files only (`path`: Terraform, Kubernetes
YAML, NuGet config, Freemius PHP): codelsi skips those files whole, as secret-bearing or as
other languages.
"""
import json
import sys

source = json.load(open(sys.argv[1]))["rules"]
first = source[0]["allowlist"][0]
assert all(r["allowlist"][0] == first for r in source), "the first allowlist is the global one"
key = lambda a: {k: a[k] for k in ("target", "regexes", "stopwords") if a[k]}
rules = []
for r in source:
    if r["path"]:
        continue
    allow = []
    for a in r["allowlist"][1:]:
        if a["condition"] == "and" and a["paths"]:
            continue
        if a["regexes"] or a["stopwords"]:
            allow.append({**key(a), "all": a["condition"] == "and"})
    rules.append(
        {
            "id": r["id"],
            "keywords": r["keywords"],
            "pattern": r["pattern"],
            "secret_group": r["secret_group"],
            "min_entropy": r["min_entropy"],
            "allow": allow,
        }
    )
out = {
    "source": "gitleaks v8.30.1 default rules (MIT, Copyright (c) 2019 Zachary Rice), as translated "
    "for Rust's regex crate by keyspoor 0.1.4 (Apache-2.0)",
    "global": key(first),
    "rules": rules,
}
path = __file__.rsplit("/", 1)[0] + "/gitleaks.json"
with open(path, "w") as f:
    json.dump(out, f, indent=0, sort_keys=True)
    f.write("\n")
print(f"{len(rules)} rules -> {path}")
