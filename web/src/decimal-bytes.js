// Uppy's byte counts in decimal units (1 MB = 10^6 bytes), as filedock's dashboard and command
// line print them: `make web` puts this in place of @transloadit/prettier-bytes, whose units
// are binary (191 "MB" for a 200 MB file) under decimal names.
const units = ['B', 'kB', 'MB', 'GB', 'TB', 'PB', 'EB']

export function prettierBytes(input, unit) {
  if (typeof input !== 'number' || Number.isNaN(input)) throw new TypeError(`Expected a number, got ${typeof input}`)
  if (input === 0) return '0 B'
  const num = Math.abs(input)
  const exponent = unit ? units.indexOf(unit) : Math.min(Math.floor(Math.log10(num) / 3), units.length - 1)
  const value = input / 1000 ** exponent
  return `${exponent === 0 || Math.abs(value) >= 100 ? Math.round(value) : value.toFixed(1)} ${units[exponent]}`
}
