import socket, threading, time, sys
N = int(sys.argv[1]); port = int(sys.argv[2]); want = int(sys.argv[3])
res = {}
def client(i):
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(b"GET /events HTTP/1.0\r\nHost: x\r\n\r\n")
    buf = b""; first = last = None; n = 0
    s.settimeout(30)
    while n < want:
        try:
            chunk = s.recv(1 << 16)
        except socket.timeout:
            break
        if not chunk: break
        buf += chunk
        *done, buf = buf.split(b"\n\n")
        c = sum(1 for e in done if b'"state":"offline"' in e)
        if c:
            now = time.time()
            if first is None: first = now
            last = now; n += c
    res[i] = (n, first, last)
ts = [threading.Thread(target=client, args=(i,)) for i in range(N)]
[t.start() for t in ts]; [t.join() for t in ts]
for i, (n, f, l) in sorted(res.items()):
    print(f"client {i}: {n} offline events in {l - f:.3f} s = {n / max(l - f, 1e-9):.0f}/s")
