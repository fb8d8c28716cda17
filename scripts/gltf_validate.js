#!/usr/bin/env node
// Validate a .glb/.gltf with the Khronos glTF validator and print its report as JSON on stdout.
//
//   node scripts/gltf_validate.js FILE [--max-issues N]
//
// Exit status: 0 = no errors (warnings/infos allowed), 1 = the report has errors,
// 2 = usage error, unreadable file, or the validator package is not installed.
// The package is looked up in $GLTF_VALIDATOR_DIR, then <repo>/.tools/node_modules
// (install: npm install --prefix .tools gltf-validator@2.0.0-dev.3.10), then node's usual paths.
'use strict';
const fs = require('fs');
const path = require('path');

function loadValidator() {
  const roots = [];
  if (process.env.GLTF_VALIDATOR_DIR) roots.push(process.env.GLTF_VALIDATOR_DIR);
  roots.push(path.join(__dirname, '..', '.tools', 'node_modules'));
  roots.push(path.join(__dirname, '..', '.tools'));
  for (const root of roots) {
    try {
      return require(require.resolve('gltf-validator', { paths: [root] }));
    } catch (e) { /* try the next place */ }
  }
  try {
    return require('gltf-validator');
  } catch (e) {
    return null;
  }
}

async function main() {
  const args = process.argv.slice(2);
  let maxIssues = 100;
  const files = [];
  for (let i = 0; i < args.length; i++) {
    if (args[i] === '--max-issues') maxIssues = parseInt(args[++i], 10);
    else files.push(args[i]);
  }
  if (files.length !== 1) {
    process.stderr.write('usage: gltf_validate.js FILE [--max-issues N]\n');
    return 2;
  }
  const validator = loadValidator();
  if (validator === null) {
    process.stderr.write('gltf-validator not found: npm install --prefix .tools gltf-validator@2.0.0-dev.3.10\n');
    return 2;
  }
  const file = path.resolve(files[0]);
  let bytes;
  try {
    bytes = fs.readFileSync(file);
  } catch (e) {
    process.stderr.write(`cannot read ${file}: ${e.message}\n`);
    return 2;
  }
  const report = await validator.validateBytes(new Uint8Array(bytes), {
    uri: path.basename(file),
    maxIssues: maxIssues,
    externalResourceFunction: (uri) => new Promise((resolve, reject) => {
      fs.readFile(path.resolve(path.dirname(file), decodeURIComponent(uri)), (err, data) => {
        if (err) reject(err.toString()); else resolve(new Uint8Array(data));
      });
    }),
  });
  process.stdout.write(JSON.stringify(report, null, 2) + '\n');
  return report.issues.numErrors > 0 ? 1 : 0;
}

main().then((code) => process.exit(code), (err) => {
  process.stderr.write(`validation failed: ${err}\n`);
  process.exit(2);
});
