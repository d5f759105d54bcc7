// One upload with tus-js-client (Node), driven by filedock's tests and benchmarks.
//
//   node tus_upload.mjs '<json options>'
//
// Options: endpoint, token, path, protocol ('tus-v1' | 'ietf-draft-05'), metadata ({key: value}),
// chunkSize (bytes; default: the whole file in one request), parallelUploads (default 1),
// urlStorage (a JSON file: tus-js-client's FileUrlStorage, so a later run finds the upload again),
// stopAfter (bytes sent: abort the upload there, in the middle of a request, and exit).
//
// Prints one JSON object per line: {"event": "start", "resumedFrom": offset | null},
// {"event": "stopped", "sent": n, "url": ...}, {"event": "success", "url", "digest", "seconds"}
// or {"event": "error", "message", "status"} (exit code 1).
import { createReadStream, statSync } from 'node:fs'
import * as tus from 'tus-js-client'

const options = JSON.parse(process.argv[2])
const say = (event) => process.stdout.write(JSON.stringify(event) + '\n')
const size = statSync(options.path).size
const started = process.hrtime.bigint()
let resumedFrom = null
let lastResponse = null

const upload = new tus.Upload(createReadStream(options.path), {
  endpoint: options.endpoint,
  headers: { Authorization: 'Bearer ' + options.token },
  protocol: options.protocol || 'tus-v1',
  metadata: options.metadata || {},
  chunkSize: options.chunkSize || Infinity,
  parallelUploads: options.parallelUploads || 1,
  retryDelays: [0, 500, 1000, 3000],
  urlStorage: options.urlStorage ? new tus.FileUrlStorage(options.urlStorage) : undefined,
  storeFingerprintForResuming: Boolean(options.urlStorage),
  removeFingerprintOnSuccess: Boolean(options.urlStorage),
  onAfterResponse(req, res) {
    lastResponse = res
    // the HEAD that precedes the first PATCH of a resumed upload says where the server stands
    if (req.getMethod() === 'HEAD' && resumedFrom === null) resumedFrom = Number(res.getHeader('Upload-Offset'))
  },
  onProgress(sent) {
    if (options.stopAfter && sent >= options.stopAfter) {
      // abort mid-request (tus-js-client destroys the socket) and keep the stored URL for a later run
      upload.abort(false).then(() => {
        say({ event: 'stopped', sent, url: upload.url })
        process.exit(0)
      })
      options.stopAfter = 0
    }
  },
  onSuccess() {
    const seconds = Number(process.hrtime.bigint() - started) / 1e9
    say({
      event: 'success',
      url: upload.url,
      resumedFrom,
      digest: lastResponse ? lastResponse.getHeader('Filedock-Digest') || null : null,
      seconds,
      bytes: size,
    })
  },
  onError(err) {
    const status = err.originalResponse ? err.originalResponse.getStatus() : null
    say({ event: 'error', message: String(err.message || err), status })
    process.exit(1)
  },
})

const previous = options.urlStorage ? await upload.findPreviousUploads() : []
if (previous.length > 0) upload.resumeFromPreviousUpload(previous[0])
say({ event: 'start', previous: previous.length, url: previous.length ? previous[0].uploadUrl : null })
upload.start()
