// A minimal OpenAI-style server on Node's `http` module, for the probe tests.
//
// POST /v1/chat/completions: "stream": true gives SSE, one `data:` event per token (each in
// its own turn of the event loop), then, when stream_options.include_usage, a usage chunk, and
// `data: [DONE]` written with res.end() in the same turn: Node sends those last chunks and the
// chunked terminator in one writev of 9 segments. Otherwise one JSON body with `usage`.
// Completion tokens = max_tokens. Keep-alive (Node's default). With `--tls CERT KEY` it serves
// HTTPS (Node's `tls`: the OpenSSL in the node binary, through a memory BIO). Prints
// `listening <port>`.
const http = require('http');
const https = require('https');
const fs = require('fs');

const handler = (req, res) => {
  const parts = [];
  req.on('data', (c) => parts.push(c));
  req.on('end', () => {
    const text = Buffer.concat(parts).toString();
    const body = text ? JSON.parse(text) : {};
    const n = body.max_tokens || 4;
    const rid = req.headers['x-request-id'];
    const prompt = Math.floor(JSON.stringify(body.messages || []).length / 4);
    const usage = { prompt_tokens: prompt, completion_tokens: n, total_tokens: prompt + n };
    const headers = {};
    if (rid) headers['X-Request-Id'] = rid;
    if (body.stream) {
      headers['Content-Type'] = 'text/event-stream';
      res.writeHead(200, headers);
      let i = 0;
      const tick = () => {
        if (i < n) {
          const ev = { id: 'chatcmpl-1', object: 'chat.completion.chunk', model: body.model,
            choices: [{ index: 0, delta: { content: 'tok' + i + ' ' } }] };
          res.write('data: ' + JSON.stringify(ev) + '\n\n');
          i += 1;
          setImmediate(tick);
          return;
        }
        if (body.stream_options && body.stream_options.include_usage) {
          const ev = { id: 'chatcmpl-1', object: 'chat.completion.chunk', choices: [], usage };
          res.write('data: ' + JSON.stringify(ev) + '\n\n');
        }
        res.end('data: [DONE]\n\n');
      };
      tick();
    } else {
      const out = JSON.stringify({ id: 'chatcmpl-2', object: 'chat.completion', model: body.model,
        choices: [{ index: 0, message: { role: 'assistant', content: 'x'.repeat(n) } }], usage });
      headers['Content-Type'] = 'application/json';
      headers['Content-Length'] = Buffer.byteLength(out);
      res.writeHead(200, headers);
      res.end(out);
    }
  });
};

const at = process.argv.indexOf('--tls');
const server = at > 0
  ? https.createServer({ cert: fs.readFileSync(process.argv[at + 1]),
    key: fs.readFileSync(process.argv[at + 2]) }, handler)
  : http.createServer(handler);

server.listen(0, '127.0.0.1', () => {
  console.log('listening ' + server.address().port);
});
