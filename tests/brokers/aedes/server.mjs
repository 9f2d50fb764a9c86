// Aedes on 127.0.0.1:<port> (argv[2]), in-memory: a restart loses its sessions and
// retained messages, as a broker without persistence does.
import net from 'node:net'
import { Aedes } from 'aedes'

const port = Number(process.argv[2])
const aedes = await Aedes.createBroker()
net.createServer(aedes.handle).listen(port, '127.0.0.1', () => {
  console.log(`aedes listening on ${port}`)
})
