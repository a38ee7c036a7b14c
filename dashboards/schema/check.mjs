#!/usr/bin/env node
// Type-checks Grafana dashboard JSON files against Grafana's dashboard schema, the
// `@grafana/schema` package, with the TypeScript compiler. Both are pinned in package.json
// and package-lock.json beside this script; `install.sh` installs them into a prefix.
//
//   node dashboards/schema/check.mjs --modules DIR FILE.json...
//
// DIR is where install.sh ran `npm ci`. Every `@grafana/schema` there is checked against:
// the package itself (the newest Grafana) and each `grafana-schema-<version>` alias (the
// oldest Grafana the dashboards support, see dashboards/README.md).
//
// Each file becomes `const dashboard: Dashboard = <the file's text>;` (dashboard-types.ts
// says what `Dashboard` is), so the compiler checks every key and value of the JSON as an
// object literal: unknown keys, missing required keys, wrong types and values outside an
// enum are errors. Errors are printed as `FILE:LINE:COL: PATH: [schema]: message` (PATH is
// where in the JSON, e.g. `panels[2].options.legend`); the exit status is 1 if there was
// any. Prints `ok FILE (schemas)` for each file without errors.

import fs from 'node:fs';
import path from 'node:path';
import { createRequire } from 'node:module';
import { fileURLToPath } from 'node:url';

const here = path.dirname(fileURLToPath(import.meta.url));
const args = process.argv.slice(2);
let modules = null;
const files = [];
for (let i = 0; i < args.length; i++) {
  if (args[i] === '--modules') modules = args[++i];
  else files.push(args[i]);
}
if (!modules || files.length === 0) {
  console.error('usage: check.mjs --modules DIR FILE.json...');
  process.exit(2);
}
modules = path.resolve(modules);
const ts = createRequire(path.join(modules, 'package.json'))('typescript');

// The schema packages: @grafana/schema and its aliases (npm:@grafana/schema@<version>).
const nodeModules = path.join(modules, 'node_modules');
const schemas = [path.join(nodeModules, '@grafana/schema')]
  .concat(
    fs
      .readdirSync(nodeModules)
      .filter((d) => d.startsWith('grafana-schema-'))
      .map((d) => path.join(nodeModules, d)),
  )
  .map((dir) => {
    const pkg = JSON.parse(fs.readFileSync(path.join(dir, 'package.json'), 'utf8'));
    if (pkg.name !== '@grafana/schema') throw new Error(`${dir} is not @grafana/schema`);
    return { dir, label: `@grafana/schema ${pkg.version}`, types: path.join(dir, pkg.types) };
  });

// Virtual sources live in the modules directory, so imports resolve from its node_modules;
// the type definitions are read from beside this script.
const root = path.join(modules, '.credwatch-check');
const virtual = new Map();
const typesFile = path.join(root, 'dashboard-types.ts');
virtual.set(typesFile, fs.readFileSync(path.join(here, 'dashboard-types.ts'), 'utf8'));
const PREFIX = 'const dashboard: Dashboard = ';
const SUFFIX = ';\nimport type { Dashboard } from "./dashboard-types";\nexport {};\n';
const sources = new Map(); // virtual path -> dashboard file
let failed = false;
files.forEach((file, i) => {
  const text = fs.readFileSync(file, 'utf8');
  try {
    JSON.parse(text);
  } catch (e) {
    console.log(`${file}: not JSON: ${e.message}`);
    failed = true;
    return;
  }
  const name = path.join(root, `dashboard-${i}.ts`);
  virtual.set(name, PREFIX + text + SUFFIX);
  sources.set(name, file);
});

/** Where in the JSON the node at `pos` is: `panels[3].options.legend`. */
function jsonPath(sf, pos) {
  let node = sf;
  for (;;) {
    const child = node.getChildren(sf).find((c) => c.getStart(sf) <= pos && pos < c.getEnd());
    if (!child) break;
    node = child;
  }
  const parts = [];
  for (let n = node; n && n.parent; n = n.parent) {
    const p = n.parent;
    if (ts.isVariableDeclaration(p)) break;
    if (ts.isPropertyAssignment(p) && p.initializer === n) parts.push('.' + p.name.text);
    else if (ts.isPropertyAssignment(p) && p.name === n) parts.push('.' + p.name.text);
    else if (ts.isArrayLiteralExpression(p)) parts.push(`[${p.elements.indexOf(n)}]`);
  }
  return parts.reverse().join('').replace(/^\./, '') || '(top level)';
}

const bad = new Set();
for (const schema of schemas) {
  const options = {
    strict: true,
    noEmit: true,
    target: ts.ScriptTarget.ES2022,
    module: ts.ModuleKind.ESNext,
    moduleResolution: ts.ModuleResolutionKind.Bundler,
    // Every import of @grafana/schema, the package's own included, is this version.
    paths: {
      '@grafana/schema': [schema.types],
      '@grafana/schema/*': [path.join(schema.dir, '*')],
    },
    types: [],
    lib: ['lib.es2022.d.ts'],
  };
  const host = ts.createCompilerHost(options);
  const { getSourceFile, fileExists, readFile, directoryExists } = host;
  host.fileExists = (f) => virtual.has(f) || fileExists.call(host, f);
  host.readFile = (f) => (virtual.has(f) ? virtual.get(f) : readFile.call(host, f));
  host.directoryExists = (d) => d === root || directoryExists.call(host, d);
  host.getSourceFile = (f, lang, onError, create) =>
    virtual.has(f)
      ? ts.createSourceFile(f, virtual.get(f), lang, true)
      : getSourceFile.call(host, f, lang, onError, create);
  const program = ts.createProgram([...sources.keys(), typesFile], options, host);
  const seen = new Set();
  for (const d of ts.getPreEmitDiagnostics(program)) {
    const message = ts.flattenDiagnosticMessageText(d.messageText, '\n    ');
    failed = true;
    const original = d.file && sources.get(d.file.fileName);
    if (!original) {
      // The check itself is broken (dashboard-types.ts, or the installed packages).
      const at = d.file ? `${d.file.fileName}:${d.file.getLineAndCharacterOfPosition(d.start).line + 1}: ` : '';
      console.log(`check.mjs: ${at}[${schema.label}]: TS${d.code}: ${message}`);
      continue;
    }
    const { line, character } = d.file.getLineAndCharacterOfPosition(d.start);
    const col = line === 0 ? character - PREFIX.length : character;
    const out = `${original}:${line + 1}:${col + 1}: ${jsonPath(d.file, d.start)}: [${schema.label}]: TS${d.code}: ${message}`;
    if (!seen.has(out)) console.log(out);
    seen.add(out);
    bad.add(original);
  }
}
const labels = schemas.map((s) => s.label.replace('@grafana/schema ', '')).join(', ');
for (const file of sources.values()) if (!bad.has(file)) console.log(`ok ${file} (@grafana/schema ${labels})`);
process.exit(failed ? 1 : 0);
