// Offline cache of the demo: every file it needs is cached on install; requests
// go to the network first (so a rebuilt page shows at once) and fall back to
// the cache when offline.
const CACHE = 'mhc-web-v1';
const FILES = [
  './',
  'index.html',
  'style.css',
  'app.js',
  'charts.js',
  'worker.js',
  'pkg/mhc_wasm.js',
  'pkg/mhc_wasm_bg.wasm',
  'data/classics.txt',
];

self.addEventListener('install', (event) => {
  event.waitUntil(
    caches.open(CACHE).then((cache) => cache.addAll(FILES)).then(() => self.skipWaiting()),
  );
});

self.addEventListener('activate', (event) => {
  event.waitUntil(
    caches.keys()
      .then((keys) => Promise.all(keys.filter((k) => k !== CACHE).map((k) => caches.delete(k))))
      .then(() => self.clients.claim()),
  );
});

self.addEventListener('fetch', (event) => {
  const request = event.request;
  if (request.method !== 'GET' || new URL(request.url).origin !== self.location.origin) return;
  event.respondWith(
    fetch(request)
      .then((response) => {
        if (response.ok) {
          const copy = response.clone();
          caches.open(CACHE).then((cache) => cache.put(request, copy));
        }
        return response;
      })
      .catch(() => caches.match(request, { ignoreSearch: true }).then((hit) => hit ?? Response.error())),
  );
});
