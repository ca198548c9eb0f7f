# tiny safetensors editor: st.py IN OUT add NAME | nan NAME | inf NAME
import json, struct, sys
src, dst, op, name = sys.argv[1:5]
b = open(src, 'rb').read(); n = struct.unpack('<Q', b[:8])[0]
h = json.loads(b[8:8+n]); data = bytearray(b[8+n:])
if op == 'add':
    off = len(data); data += struct.pack('<2f', 0, 0)
    h[name] = {"dtype": "F32", "shape": [2], "data_offsets": [off, off+8]}
else:
    s = h[name]['data_offsets'][0]
    data[s+4:s+8] = struct.pack('<f', float(op))
hb = json.dumps(h).encode(); hb += b' ' * (-len(hb) % 8)
open(dst, 'wb').write(struct.pack('<Q', len(hb)) + hb + data)
