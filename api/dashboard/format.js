// Numbers as a person reads them.

export function bytes(n) {
  if (n === null || n === undefined) return "–";
  const units = ["B", "KB", "MB", "GB", "TB"];
  let i = 0;
  while (Math.abs(n) >= 1000 && i < units.length - 1) { n /= 1000; i++; }
  return `${n.toFixed(n >= 100 || i === 0 ? 0 : 1)} ${units[i]}`;
}

// Bandwidth in bits per second, as links are sold.
export function bits(Bps) {
  if (Bps === null || Bps === undefined) return "–";
  const b = Bps * 8;
  if (b >= 1e9) return `${(b / 1e9).toFixed(b >= 1e10 ? 0 : 1)} Gbit/s`;
  if (b >= 1e6) return `${(b / 1e6).toFixed(b >= 1e8 ? 0 : 1)} Mbit/s`;
  if (b >= 1e3) return `${(b / 1e3).toFixed(0)} kbit/s`;
  return `${b.toFixed(0)} bit/s`;
}

export function rate(Bps) {
  return Bps ? `${bytes(Bps)}/s` : "idle";
}

export function ms(s) {
  if (s === null || s === undefined) return "–";
  return s < 0.01 ? `${(s * 1000).toFixed(2)} ms` : `${(s * 1000).toFixed(s < 1 ? 1 : 0)} ms`;
}

export function duration(s) {
  if (s === null || s === undefined || !isFinite(s)) return "–";
  if (s < 60) return `${s.toFixed(s < 10 ? 1 : 0)} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${Math.round(s % 60)} s`;
  return `${Math.floor(s / 3600)} h ${Math.round((s % 3600) / 60)} min`;
}

export function pct(x) {
  return `${Math.round(x * 100)}%`;
}

export const TYPE_NAMES = {
  thunderbolt5: "Thunderbolt 5",
  thunderbolt: "Thunderbolt",
  ethernet: "Ethernet",
  wifi: "WiFi",
  vpn: "VPN",
  loopback: "loopback",
  other: "other",
};

export function linkType(t) {
  return TYPE_NAMES[t] || t;
}
