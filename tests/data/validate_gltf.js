const validator = require('gltf-validator');
const fs = require('fs');
const data = new Uint8Array(fs.readFileSync(process.argv[2]));
validator.validateBytes(data).then(r => {
  console.log(JSON.stringify({errors: r.issues.numErrors, warnings: r.issues.numWarnings, infos: r.issues.numInfos,
    messages: r.issues.messages.slice(0, 10).map(m => m.severity + ' ' + m.code + ' ' + m.message)}));
  process.exit(r.issues.numErrors ? 1 : 0);
}).catch(e => { console.error(e); process.exit(2); });
