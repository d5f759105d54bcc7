// One upload with tus-js-client in Node for `make bench`, timed from start() to onSuccess
// (creation, every PATCH and, with parallelUploads, the concatenation; not Node's start-up).
//
//   node tus_js_upload.mjs ENDPOINT TOKEN FILE PARALLEL JOB
//
// Prints {"seconds": s, "url": ...} on success; exits 1 with the error otherwise.
import { createReadStream } from 'node:fs'
import { basename } from 'node:path'
import * as tus from 'tus-js-client'

const [endpoint, token, path, parallel, job] = process.argv.slice(2)
const started = process.hrtime.bigint()
let transferred = null
const upload = new tus.Upload(createReadStream(path), {
  endpoint,
  headers: token ? { Authorization: 'Bearer ' + token } : {},
  metadata: { job, filename: basename(path) },
  // the partial uploads of parallelUploads name the job too (an admin token is bound to none)
  metadataForPartialUploads: { job },
  parallelUploads: Number(parallel),
  chunkSize: Infinity, // each part in one PATCH: what a fast client does (small chunks ruin any server)
  retryDelays: [],
  onProgress(sent, total) {
    // every byte handed over: with parallelUploads, the streams' aggregate ends here, before the final
    // upload asks the server to concatenate the parts (which onSuccess includes)
    if (sent === total && transferred === null) transferred = Number(process.hrtime.bigint() - started) / 1e9
  },
  onSuccess() {
    const seconds = Number(process.hrtime.bigint() - started) / 1e9
    console.log(JSON.stringify({ seconds, transfer_seconds: transferred, url: upload.url }))
  },
  onError(err) {
    console.error(String(err.message || err))
    process.exit(1)
  },
})
upload.start()
