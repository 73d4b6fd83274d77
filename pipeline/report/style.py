"""The report's inline stylesheet: system fonts, a picture beside its numbers, and a print layout."""

CSS = """
:root{--ink:#111827;--muted:#6b7280;--line:#e5e7eb;--ok:#15803d;--bad:#b91c1c;--warn:#b45309;--bg:#f9fafb;
--accent:#2563eb}
*{box-sizing:border-box}
body{margin:0;font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",Arial,sans-serif;
color:var(--ink);background:#fff}
header,main,footer{max-width:1240px;margin:0 auto;padding:0 24px}
header{padding-top:20px}
h1{font-size:22px;margin:0 0 2px}
h2{font-size:18px;margin:0 0 4px;padding-top:8px}
h3{font-size:15px;margin:16px 0 6px}
code{font:12px ui-monospace,"DejaVu Sans Mono",Menlo,monospace;background:var(--bg);padding:1px 4px;border-radius:3px;
word-break:break-all}
.where,.when,.note,footer{color:var(--muted);font-size:12.5px}
.when{margin:0 0 8px}
.pills{display:flex;flex-wrap:wrap;gap:6px;list-style:none;padding:0;margin:10px 0}
.pill{border:1px solid var(--line);border-radius:999px;padding:2px 10px;font-size:12.5px;background:var(--bg)}
.pill a{color:inherit;font-weight:600;text-decoration:none}
.pill span{color:var(--muted)}
.pill.complete,.pill.published{border-color:#86efac;background:#f0fdf4}
.pill.failed,.pill.blocked{border-color:#fca5a5;background:#fef2f2}
.pill.interrupted{border-color:#fcd34d;background:#fffbeb}
.banner{padding:10px 14px;border-radius:6px;margin:10px 0;border:1px solid}
.banner.ok{background:#f0fdf4;border-color:#86efac}
.banner.bad{background:#fef2f2;border-color:#fca5a5}
.banner.warn{background:#fffbeb;border-color:#fcd34d}
nav{display:flex;flex-wrap:wrap;gap:14px;border-bottom:1px solid var(--line);padding:8px 0;margin-top:8px}
nav a{color:var(--accent);text-decoration:none;font-weight:600}
section.stage{border-bottom:1px solid var(--line);padding:10px 0 18px}
section.missing .state{font-weight:600;color:var(--muted)}
section.missing .state.failed,section.missing .state.blocked{color:var(--bad)}
section.missing .state.interrupted{color:var(--warn)}
.pair{display:grid;grid-template-columns:minmax(0,max-content) minmax(260px,1fr);gap:18px;align-items:start;margin:8px 0}
.pair>:last-child{min-width:0;overflow-x:auto}
figure{margin:0}
figure svg{max-width:100%;height:auto;display:block}
figcaption{color:var(--muted);font-size:12px;margin-top:2px}
table{border-collapse:collapse;font-size:12.5px;margin:6px 0 10px}
caption{text-align:left;font-weight:600;padding:2px 0;color:var(--ink)}
th,td{padding:3px 8px;border-bottom:1px solid var(--line);text-align:left;vertical-align:top}
thead th{color:var(--muted);font-weight:600;border-bottom:1.5px solid #d1d5db}
table.kv th{font-weight:normal;color:var(--muted)}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
td.hash{font:11.5px ui-monospace,"DejaVu Sans Mono",monospace;word-break:break-all}
td.text{max-width:380px;font-size:12px}
td.ok{color:var(--ok)}td.bad,ul.bad,p.bad{color:var(--bad)}
.verdict.passed{color:var(--ok)}.verdict.failed{color:var(--bad)}
table.headline{min-width:420px}
table.headline td.num{font-weight:600}
pre{white-space:pre-wrap;font-size:11px;background:var(--bg);padding:8px}
@media (max-width:900px){.pair{grid-template-columns:1fr}}
@media print{
  @page{size:A4;margin:12mm}
  body{font-size:10.5px}
  header,main,footer{max-width:none;padding:0}
  nav{display:none}
  .pair{grid-template-columns:minmax(0,1.6fr) minmax(0,1fr);gap:10px}
  figure,table,.pair{break-inside:avoid}
  section.stage{break-inside:auto}
  h2{break-after:avoid}
  a{color:inherit;text-decoration:none}
  .banner,.pill{-webkit-print-color-adjust:exact;print-color-adjust:exact}
}
"""
