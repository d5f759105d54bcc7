// The official Node tus server for `make bench`: @tus/server with @tus/file-store, as its README
// starts it. It never fsyncs: a 204 means the bytes reached the page cache, not the disk.
//
//   node tus_server.mjs PORT DIRECTORY      (prints "listening PORT" once it accepts connections)
import { FileStore } from '@tus/file-store'
import { Server } from '@tus/server'

const [port, directory] = process.argv.slice(2)
const server = new Server({ path: '/files', datastore: new FileStore({ directory }) })
const listener = server.listen({ host: '127.0.0.1', port: Number(port) }, () => {
  console.log(`listening ${listener.address().port}`)
})
process.on('SIGTERM', () => listener.close(() => process.exit(0)))
