//! The grader: run as `node -e` in the sandbox by `eval::score` (`GRADER` in `mod.rs`). It
//! loads a completion's program and runs the problem's tests against it, and prints the run's
//! proof only when every test ran to its end without throwing.
//!
//! Threat model. The completion is hostile and runs with all of JavaScript, in this process.
//! It may print anything, exit with any code, install exit and exception handlers, replace
//! globals, prototypes and module exports, and read what it can reach. What decides the result
//! is held where it cannot reach:
//! - the proof (a per-run secret) and the tests come on stdin, read whole and held in this
//!   strict module's closure before the completion loads; stdin is then drained, and the
//!   tests are never written to disk, so it can neither print the proof nor read the expected
//!   values. (Reading this process's memory through /proc needs the file system outside its
//!   folder, which node's permission model refuses, as it refuses the inspector.)
//! - the tests are compiled before the completion loads, in a fresh context (their own
//!   Object, Array, Function...), so what the completion does to this context's globals and
//!   prototypes does not touch them; strict, so a completion's function cannot reach its
//!   caller (the tests) through `caller`.
//! - the tests' `require` is this file's, and gives them only `assert`, loaded and frozen
//!   before the completion: replacing `assert.deepEqual` or `require` changes nothing.
//! - the tests run synchronously inside this file's try: an exception anywhere in them fails
//!   the run, whatever handlers the completion installed; the proof is printed with the
//!   `writeSync` taken before the completion loads, then this file exits.
//! Left: loose `deepEqual` compares primitives with `==`, so a value that coerces to the
//! expected one passes, as under the suites' own harness.
'use strict';
const fs = require('fs');
const vm = require('vm');
const assert = require('assert');
const writeSync = fs.writeSync;
const { inspect } = require('util');
const exit = process.exit;
const job = JSON.parse(fs.readFileSync(0, 'utf8'));
for (const a of [assert, assert.strict]) {
  Object.freeze(a);
  Object.freeze(a.AssertionError.prototype);
}
const ASSERT = new Set(['assert', 'node:assert', 'assert/strict', 'node:assert/strict']);
const testsRequire = (name) => {
  if (ASSERT.has(name)) {
    return name.endsWith('strict') ? assert.strict : assert;
  }
  throw new Error(`the tests may require only assert, not ${name}`);
};
const context = vm.createContext({ console });
const tests = vm.compileFunction(`'use strict';\n${job.tests}`, ['require', 'exports', 'module', ...job.names], {
  filename: 'tests.js',
  parsingContext: context,
});
const testsModule = vm.runInContext('({ exports: {} })', context);

/** Load the program and run the tests; whether every test ran to its end. Returns rather than
 * exits on failure: the completion may have made `process.exit` return. */
function grade() {
  fs.writeFileSync('solution.js', job.solution);
  let scope;
  try {
    scope = require(require('path').resolve('solution.js'));
  } catch (e) {
    writeSync(2, `the program threw while loading: ${inspect(e)}\n`);
    return false;
  }
  const bound = job.names.map((n) => (scope !== null && typeof scope === 'object' ? scope[n] : undefined));
  try {
    tests(testsRequire, testsModule.exports, testsModule, ...bound);
  } catch (e) {
    writeSync(2, `${inspect(e)}\n`);
    return false;
  }
  return true;
}

if (grade()) {
  writeSync(1, `\n${job.proof}\n`);
  exit(0);
} else {
  exit(1);
}
