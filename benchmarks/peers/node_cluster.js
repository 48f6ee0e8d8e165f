// Node.js cluster peer: a primary and N workers serving what dispatch.demo:app
// serves: "hello from worker pid N\n" over HTTP/1.1, keep-alive unless the client
// says Connection: close; /burn?ms=N burns N ms of CPU first (blocking the
// worker, as the demo's coroutine handler blocks its event loop) and /slow?ms=N
// waits N ms first.
//
//   NODE_CLUSTER_SCHED_POLICY=rr   node node_cluster.js PORT [WORKERS]   (the default
//                                  on Linux: the primary accepts and hands each
//                                  connection to a worker over IPC)
//   NODE_CLUSTER_SCHED_POLICY=none node node_cluster.js PORT [WORKERS]   (workers
//                                  accept on the shared listener themselves)
//
// Node reads NODE_CLUSTER_SCHED_POLICY itself when the cluster module loads.
// Binds 127.0.0.1 only.
'use strict';
const cluster = require('node:cluster');
const http = require('node:http');

const port = Number(process.argv[2] || 8000);
const workers = Number(process.argv[3] || 2);

if (cluster.isPrimary) {
  for (let i = 0; i < workers; i++) cluster.fork();
  // Replace a worker that dies (Node does not by itself), as dispatch does;
  // python -m benchmarks failures kills workers under load.
  let stopping = false;
  cluster.on('exit', () => { if (!stopping) cluster.fork(); });
  const stop = () => {
    stopping = true;
    for (const id in cluster.workers) cluster.workers[id].process.kill('SIGTERM');
    process.exit(0);
  };
  process.on('SIGTERM', stop);
  process.on('SIGINT', stop);
} else {
  const body = Buffer.from(`hello from worker pid ${process.pid}\n`);
  const send = (res) => {
    res.writeHead(200, { 'Content-Type': 'text/plain', 'Content-Length': body.length });
    res.end(body);
  };
  http.createServer((req, res) => {
    const q = req.url.indexOf('?');
    const route = q < 0 ? req.url : req.url.slice(0, q);
    const ms = q < 0 ? 0 : Number(new URLSearchParams(req.url.slice(q + 1)).get('ms')) || 0;
    if (route === '/burn' && ms > 0) {
      const end = performance.now() + ms;
      while (performance.now() < end) { /* burn */ }
    } else if (route === '/slow' && ms > 0) {
      setTimeout(send, ms, res);
      return;
    }
    send(res);
  }).listen(port, '127.0.0.1');
}
