// Checks Prometheus Operator resources against npm @kubernetes-models/prometheus-operator, the
// TypeScript models generated from the Operator's Go API types (pkg/apis/monitoring v1,
// v1alpha1), in two ways:
//   tsc       each resource is written as an object literal typed with the package's
//             interface (`const item0: IPodMonitor = {...}`) and type-checked by TypeScript's
//             compiler API as `tsc --noEmit --strict` would: the excess property check of object
//             literals refuses a field the Go type does not declare, the types a wrong type
//             (enums are plain strings there). The compiler names the first problem of each
//             item only.
//   validate  the package's class (`new PodMonitor(r).validate()`): ajv against the schema
//             generated with the types (types, required fields, enums; unknown fields pass).
//
//   node tests/operator_models.mjs NODE_MODULES < items.json
//
// NODE_MODULES: the node_modules folder holding typescript and the package (scripts/test installs
// them into .cache/npm). items.json: [{"type": "monitoring.coreos.com/v1/PodMonitor",
// "value": {...}}, ...], a type being <group>/<version>/<Kind> of one of the package's models,
// a Kind without apiVersion/kind (Route, say) included. Writes one JSON array per item, in order:
// the problems found, each {"check": "tsc" | "validate", "path": ".spec.x[0].y", "message"};
// problems of the typed file outside every item (an import that does not resolve) come under an
// extra item at the end, which is [] when there are none.
import { readFileSync } from "node:fs";
import { createRequire } from "node:module";
import { dirname, join, resolve } from "node:path";
import { pathToFileURL } from "node:url";

const PACKAGE = "@kubernetes-models/prometheus-operator";
const nodeModules = resolve(process.argv[2] ?? "");
const ts = createRequire(join(nodeModules, "noop.js"))("typescript");
const items = JSON.parse(readFileSync(0, "utf8"));

function model(type) {
  const match = /^([a-z.]+)\/(v[0-9a-z]+)\/([A-Za-z0-9]+)$/.exec(type);
  if (!match) throw new Error(`not a <group>/<version>/<Kind>: ${type}`);
  const [, group, version, kind] = match;
  return { module: `${PACKAGE}/${group}/${version}/${kind}`, kind, iface: `I${kind}` };
}

// --- tsc ------------------------------------------------------------------------------------

// A value as a TypeScript literal: JSON, with the keys that are identifiers unquoted (as the
// compiler's messages then name them: 'groupby', not '"groupby"').
function literal(value, indent = "") {
  const inner = `${indent} `;
  if (Array.isArray(value)) {
    if (value.length === 0) return "[]";
    return `[\n${value.map((v) => inner + literal(v, inner)).join(",\n")}\n${indent}]`;
  }
  if (value !== null && typeof value === "object") {
    const entries = Object.entries(value);
    if (entries.length === 0) return "{}";
    const key = (k) => (/^[A-Za-z_$][A-Za-z0-9_$]*$/.test(k) ? k : JSON.stringify(k));
    const lines = entries.map(([k, v]) => `${inner}${key(k)}: ${literal(v, inner)}`);
    return `{\n${lines.join(",\n")}\n${indent}}`;
  }
  return JSON.stringify(value);
}

// The typed source: one import per model, one const per item, each value on lines of its own.
function typedSource() {
  const imports = new Map();
  for (const { type } of items) {
    const { module, iface } = model(type);
    imports.set(module, iface);
  }
  const lines = [];
  let alias = 0;
  const aliases = new Map();
  for (const [module, iface] of imports) {
    const name = `${iface}_${alias++}`;
    aliases.set(module, name);
    lines.push(`import type { ${iface} as ${name} } from ${JSON.stringify(module)};`);
  }
  items.forEach(({ type, value }, index) => {
    const name = aliases.get(model(type).module);
    lines.push(`export const item${index}: ${name} = ${literal(value)};`);
  });
  return lines.join("\n") + "\n";
}

// The path of the innermost property or element of a literal that holds position `at`.
function pathAt(node, at, path) {
  if (ts.isObjectLiteralExpression(node)) {
    for (const property of node.properties) {
      if (property.getStart() <= at && at < property.end && ts.isPropertyAssignment(property)) {
        const key = `${path}.${property.name.text}`;
        if (at < property.name.end) return key;
        return pathAt(property.initializer, at, key);
      }
    }
  } else if (ts.isArrayLiteralExpression(node)) {
    for (const [index, element] of node.elements.entries()) {
      if (element.getStart() <= at && at < element.end) {
        return pathAt(element, at, `${path}[${index}]`);
      }
    }
  }
  return path;
}

function typeCheck() {
  const problems = items.map(() => []);
  const outside = [];
  // In the folder above node_modules, so that the package's imports resolve as they would from
  // a project there; never written to disk.
  const fileName = join(dirname(nodeModules), "vigil-operator-resources.ts");
  const text = typedSource();
  const options = {
    strict: true,
    noEmit: true,
    target: ts.ScriptTarget.ES2022,
    module: ts.ModuleKind.ESNext,
    moduleResolution: ts.ModuleResolutionKind.Bundler,
    types: [],
  };
  const host = ts.createCompilerHost(options);
  const { getSourceFile, fileExists, readFile } = host;
  host.getSourceFile = (name, language, ...rest) =>
    resolve(name) === fileName
      ? ts.createSourceFile(name, text, language, true)
      : getSourceFile.call(host, name, language, ...rest);
  host.fileExists = (name) => resolve(name) === fileName || fileExists.call(host, name);
  host.readFile = (name) => (resolve(name) === fileName ? text : readFile.call(host, name));
  const program = ts.createProgram([fileName], options, host);
  const source = program.getSourceFile(fileName);
  const declarations = new Map();
  for (const statement of source.statements) {
    if (ts.isVariableStatement(statement)) {
      const [declaration] = statement.declarationList.declarations;
      declarations.set(Number(declaration.name.text.slice("item".length)), declaration);
    }
  }
  for (const diagnostic of ts.getPreEmitDiagnostics(program)) {
    const message = ts.flattenDiagnosticMessageText(diagnostic.messageText, " ");
    const at = diagnostic.start ?? -1;
    const found =
      diagnostic.file?.fileName === source.fileName
        ? [...declarations].find(([, d]) => d.getStart() <= at && at < d.end)
        : undefined;
    if (found) {
      const [index, declaration] = found;
      const path = pathAt(declaration.initializer, at, "");
      problems[index].push({ check: "tsc", path, message });
    } else {
      const where = diagnostic.file ? `${diagnostic.file.fileName}:${at}` : "";
      outside.push({ check: "tsc", path: where, message });
    }
  }
  return { problems, outside };
}

// --- validate -------------------------------------------------------------------------------

function instancePath(pointer) {
  return pointer
    .split("/")
    .slice(1)
    .map((part) => part.replaceAll("~1", "/").replaceAll("~0", "~"))
    .map((part) => (/^[0-9]+$/.test(part) ? `[${part}]` : `.${part}`))
    .join("");
}

async function validateAll(problems) {
  for (const [index, { type, value }] of items.entries()) {
    const { module, kind } = model(type);
    const file = join(nodeModules, `${module}.js`);
    const Model = (await import(pathToFileURL(file).href))[kind];
    try {
      new Model(value).validate();
    } catch (error) {
      if (!Array.isArray(error.errors)) throw error;
      const seen = new Set();
      for (const e of error.errors) {
        const path = instancePath(e.instancePath);
        const extra = e.params?.allowedValues ? ` (${e.params.allowedValues.join(", ")})` : "";
        const message = `${e.message}${extra}`;
        if (!seen.has(path + message)) {
          seen.add(path + message);
          problems[index].push({ check: "validate", path, message });
        }
      }
    }
  }
}

const { problems, outside } = typeCheck();
await validateAll(problems);
process.stdout.write(JSON.stringify([...problems, outside]) + "\n");
