// filedock's upload page: Uppy's dashboard sending files over tus to this server's /files/.
//
// Bundled by `make web` (esbuild) into src/filedock/server/static/, which the Python package
// ships: the page loads nothing from anywhere but the server that serves it.
import Uppy from '@uppy/core'
import Dashboard from '@uppy/dashboard'
import Tus from '@uppy/tus'
import '@uppy/core/css/style.min.css'
import '@uppy/dashboard/css/style.min.css'
import './upload.css'

const TOKEN_KEY = 'filedock-token' // sessionStorage: shared with the dashboard, gone with the tab
const JOB_KEY = 'filedock-upload-job'
const ENDPOINT = new URL('/files/', location.href).href
// the server's digest of the whole file (blake3-4m), on the response that completes an upload
const DIGEST_HEADER = 'Filedock-Digest'
const RETRY_DELAYS = [0, 1000, 3000, 5000, 10000, 20000, 30000]

const $ = (id) => document.getElementById(id)
let token = ''
let job = null // {id, name} of the job files go into
let uppy = null
const resumedAt = new Map() // upload URL -> offset the server held when this page took it up again
const digests = new Map() // Uppy file id -> the server's digest of the stored file
// Uppy file id -> bytes sent, from every progress event: Uppy's own state stops counting once its
// rounded percentage reads 100 (99.9% of a large file), so it cannot tell "all sent" apart
const sentBytes = new Map()
let renderQueued = false

function bytes(n) {
  // decimal units, as the dashboard and the command line print them
  const units = ['bytes', 'kB', 'MB', 'GB', 'TB', 'PB']
  let i = 0
  n = Number(n)
  if (n === 1) return '1 byte'
  while (n >= 1000 && i < units.length - 1) { n /= 1000; i++ }
  return (i ? n.toFixed(1) : n) + ' ' + units[i]
}

function cell(row, value, cls) {
  const td = row.insertCell()
  td.textContent = value == null ? '' : String(value)
  if (cls) td.className = cls
  return td
}

async function api(path) {
  const r = await fetch(path, { headers: { Authorization: 'Bearer ' + token }, cache: 'no-store' })
  let body = null
  try { body = await r.json() } catch { /* not JSON: the status says enough */ }
  if (!r.ok) {
    const e = new Error(body && body.error ? body.error.message : r.statusText)
    e.status = r.status
    throw e
  }
  return body
}

function takeFragment() {
  // `/upload#token=...&job=...`: a fragment never reaches a server or its logs; drop it from the
  // address bar at once so it is not bookmarked or shared by accident
  if (!location.hash) return
  const params = new URLSearchParams(location.hash.slice(1))
  if (params.get('token')) sessionStorage.setItem(TOKEN_KEY, params.get('token'))
  if (params.get('job')) sessionStorage.setItem(JOB_KEY, params.get('job'))
  history.replaceState(null, '', location.pathname + location.search)
}

async function offerJobNames() {
  // a token of one job may not list jobs (403): then the user types the name
  try {
    const { jobs } = await api('/v1/jobs?limit=200')
    const list = $('job-names')
    list.replaceChildren(...jobs.map((j) => Object.assign(document.createElement('option'), { value: j.name })))
  } catch { /* nothing to offer */ }
}

async function openJob(tokenValue, ref) {
  token = tokenValue.trim()
  $('signin-error').textContent = ''
  if (!token || !ref.trim()) {
    $('signin-error').textContent = 'Give a token and a job.'
    return
  }
  try {
    const found = await api('/v1/jobs/' + encodeURIComponent(ref.trim()) + '?limit=1')
    job = { id: found.id, name: found.name }
  } catch (e) {
    $('signin-error').textContent = e.status === 401 ? 'That token is not valid.'
      : (e.status === 403 || e.status === 404) ? 'No such job, or this token may not upload to it.'
        : 'The server did not answer: ' + e.message
    return
  }
  sessionStorage.setItem(TOKEN_KEY, token)
  sessionStorage.setItem(JOB_KEY, job.name)
  $('signin').hidden = true
  $('upload-section').hidden = false
  $('files-section').hidden = false
  $('job-title').textContent = job.name
  $('status').textContent = 'signed in'
  startUppy()
  renderUnfinished()
}

function uploadName(file) {
  // a file dropped with its folder keeps its path under that folder, as `filedock upload DIR` names it
  const path = file.meta.relativePath || file.name
  return String(path).replace(/^\/+/, '')
}

function startUppy() {
  if (uppy) uppy.destroy()
  digests.clear()
  sentBytes.clear()
  // The instance id is part of every Uppy file id, and so of the tus fingerprint that finds an
  // unfinished upload again: the same file dropped into another job starts a new upload there.
  uppy = new Uppy({ id: 'filedock-' + job.id, meta: { job: job.id } })
  uppy.use(Dashboard, {
    inline: true,
    target: '#uppy',
    width: '100%',
    height: 380,
    fileManagerSelectionType: 'both', // files or whole folders
    proudlyDisplayPoweredByUppy: false,
    singleFileFullScreen: false,
    disableThumbnailGenerator: true, // reading images for previews costs memory and time for nothing here
    note: 'Drop files or a folder. A reload or a lost connection resumes where the server stopped.',
  })
  uppy.use(Tus, {
    endpoint: ENDPOINT,
    headers: () => ({ Authorization: 'Bearer ' + token }),
    chunkSize: Infinity, // one PATCH per file: the server streams it to disk and keeps what arrived
    limit: 4,
    retryDelays: RETRY_DELAYS,
    removeFingerprintOnSuccess: true,
    allowedMetaFields: ['job', 'filename', 'name', 'type'],
    onAfterResponse: noteResponse,
  })
  uppy.on('file-added', (file) => uppy.setFileMeta(file.id, { filename: uploadName(file) }))
  uppy.on('upload-success', (file, response) => {
    const xhr = response && response.body && response.body.xhr
    const digest = xhr && xhr.getResponseHeader(DIGEST_HEADER)
    if (digest) digests.set(file.id, digest.replace(/^blake3-4m=/, '')) // the column names the scheme
    uppy.hideInfo() // "finishing" is over
  })
  uppy.on('upload-progress', (file, progress) => {
    sentBytes.set(file.id, progress.bytesUploaded)
    if (progress.bytesTotal && progress.bytesUploaded >= progress.bytesTotal) {
      // all bytes sent: the server answers once they are on disk for good (fsync, rename, record)
      uppy.info(`${uploadName(file)}: finishing, the server is making it durable`, 'info', 3000)
      renderFiles() // now, not at the next frame: a small file's finish may be over by then
    }
  })
  uppy.on('state-update', queueRender)
  // for the browser test and for curious users
  window.filedockUppy = uppy
  window.filedockResumedAt = () => [...resumedAt.values()]
  queueRender()
}

function noteResponse(req, res) {
  // a HEAD before any PATCH is a resume: remember where the server stood
  if (req.getMethod() === 'HEAD' && res.getStatus() === 200) {
    const offset = Number(res.getHeader('Upload-Offset'))
    if (!resumedAt.has(req.getURL()) && Number.isFinite(offset)) resumedAt.set(req.getURL(), offset)
  }
}

function fileState(file) {
  const p = file.progress
  if (file.error) return ['failed', file.error]
  if (p.uploadComplete) return ['stored', 'stored']
  if (file.isPaused) return ['paused', 'paused']
  if (!p.uploadStarted) return ['waiting', 'waiting']
  // All bytes sent, no answer yet: the server is making the file durable (fsync, rename, record)
  // and answers when it is. Uppy alone would sit at 100% saying nothing (uppy#4743). No HEAD to ask:
  // on filedock a HEAD takes an upload over, and bytes still in flight would be cut off.
  if (file.size && sentBytes.get(file.id) >= file.size) return ['finishing', 'finishing: the server is making it durable']
  return ['uploading', 'uploading']
}

function queueRender() {
  if (renderQueued) return
  renderQueued = true
  requestAnimationFrame(() => { renderQueued = false; renderFiles(); renderUnfinished() })
}

function renderFiles() {
  const body = $('files')
  const files = uppy ? uppy.getFiles() : []
  let sent = 0
  let total = 0
  let stored = 0
  const rows = files.map((file) => {
    const [state, label] = fileState(file)
    const done = file.progress.uploadComplete ? file.size : (sentBytes.get(file.id) || 0)
    sent += done
    total += file.size || 0
    stored += state === 'stored'
    const row = document.createElement('tr')
    row.className = 'upload-file'
    row.dataset.state = state
    row.dataset.name = uploadName(file)
    cell(row, uploadName(file))
    cell(row, label, 'state')
    const bar = Object.assign(document.createElement('progress'), { max: file.size || 1, value: done })
    row.insertCell().append(bar)
    cell(row, bytes(done), 'num')
    cell(row, bytes(file.size), 'num')
    const url = file.tus && file.tus.uploadUrl
    cell(row, url && resumedAt.has(url) ? bytes(resumedAt.get(url)) : '', 'num resumed')
    cell(row, digests.get(file.id) || '', 'digest')
    return row
  })
  body.replaceChildren(...rows)
  $('total').textContent = files.length
    ? `${stored} of ${files.length} stored · ${bytes(sent)} of ${bytes(total)} (${total ? Math.floor((100 * sent) / total) : 0}%)`
    : ''
}

function unfinishedUploads() {
  // tus-js-client keeps `tus::<fingerprint>::<n>` -> {size, metadata, creationTime, uploadUrl} in
  // localStorage until an upload succeeds; Uppy's fingerprints start with its instance id
  const prefix = 'tus::tus-filedock-' + job.id + '-'
  const active = new Set((uppy ? uppy.getFiles() : []).map((f) => 'tus::tus-' + f.id + '-' + ENDPOINT + '::'))
  const out = []
  for (let i = 0; i < localStorage.length; i++) {
    const key = localStorage.key(i)
    if (!key || !key.startsWith(prefix)) continue
    if ([...active].some((p) => key.startsWith(p))) continue
    try { out.push({ key, ...JSON.parse(localStorage.getItem(key)) }) } catch { /* not ours */ }
  }
  return out
}

const serverOffsets = new Map() // upload URL -> offset (or an error word), asked once per page

function askOffset(upload) {
  // only for uploads this page is not sending: a HEAD takes an upload over on filedock
  if (serverOffsets.has(upload.uploadUrl)) return
  serverOffsets.set(upload.uploadUrl, '…')
  fetch(upload.uploadUrl, {
    method: 'HEAD',
    headers: { Authorization: 'Bearer ' + token, 'Tus-Resumable': '1.0.0' },
    cache: 'no-store',
  }).then((r) => {
    serverOffsets.set(upload.uploadUrl, r.ok ? Number(r.headers.get('Upload-Offset'))
      : r.status === 404 || r.status === 410 ? 'gone: starts again' : 'HTTP ' + r.status)
  }, () => serverOffsets.set(upload.uploadUrl, 'no answer')).finally(queueRender)
}

function forget(upload) {
  // the server's copy goes too (tus termination); the page forgets it whatever the answer
  localStorage.removeItem(upload.key)
  fetch(upload.uploadUrl, {
    method: 'DELETE', headers: { Authorization: 'Bearer ' + token, 'Tus-Resumable': '1.0.0' },
  }).catch(() => {})
  queueRender()
}

function renderUnfinished() {
  if (!job) return
  const uploads = unfinishedUploads()
  $('unfinished-section').hidden = uploads.length === 0
  $('unfinished').replaceChildren(...uploads.map((upload) => {
    askOffset(upload)
    const row = document.createElement('tr')
    row.className = 'unfinished'
    const meta = upload.metadata || {}
    const offset = serverOffsets.get(upload.uploadUrl)
    cell(row, meta.filename || meta.name || '?')
    cell(row, typeof offset === 'number' ? bytes(offset) : offset, 'num')
    cell(row, bytes(upload.size), 'num')
    cell(row, upload.creationTime ? new Date(upload.creationTime).toLocaleString() : '')
    const button = Object.assign(document.createElement('button'), { type: 'button', textContent: 'forget', className: 'link' })
    button.addEventListener('click', () => forget(upload))
    row.insertCell().append(button)
    return row
  }))
}

function main() {
  takeFragment()
  const savedToken = sessionStorage.getItem(TOKEN_KEY) || ''
  const savedJob = sessionStorage.getItem(JOB_KEY) || ''
  $('token').value = savedToken
  $('job').value = savedJob
  $('signin-form').addEventListener('submit', (event) => {
    event.preventDefault()
    openJob($('token').value, $('job').value)
  })
  $('token').addEventListener('change', () => { token = $('token').value.trim(); offerJobNames() })
  $('switch-job').addEventListener('click', () => {
    if (uppy) { uppy.destroy(); uppy = null }
    job = null
    $('signin').hidden = false
    $('upload-section').hidden = true
    $('files-section').hidden = true
    $('unfinished-section').hidden = true
  })
  if (savedToken) {
    token = savedToken
    offerJobNames()
    if (savedJob) openJob(savedToken, savedJob) // a reload: straight back to the job, unfinished uploads listed
  }
}

main()
