// Parses LogQL expressions with Grafana's own grammar (@grafana/lezer-logql) and prints, for
// each, null when it parses cleanly or the offset of the first syntax error.
// Input: a JSON list of expressions on stdin. Module path: argv[2].
const { parser } = require(process.argv[2]);
const exprs = JSON.parse(require("fs").readFileSync(0, "utf8"));
const results = exprs.map((expr) => {
  let error = null;
  parser.parse(expr).iterate({
    enter: (node) => {
      if (node.type.isError && error === null) error = node.from;
    },
  });
  return error;
});
console.log(JSON.stringify(results));
