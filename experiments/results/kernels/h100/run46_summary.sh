# Chained 4 s after run46.sh on the same warm H100 (its dumps.tgz, 76 MB, was over the 16 MiB a file
# and its output tail held only the last two variants): each variant's profile and ptxas report
# from the machine's /tmp.
for v in head new-s2 new-s1 loop-s2 loop-s1; do echo "== $v"; grep -E " ms per call| ms .*(chunk_grad|scores)" /tmp/log_$v.txt | cut -c1-110; grep -rhoE "[0-9]+ bytes stack frame, [0-9]+ bytes spill stores|Used [0-9]+ registers|Compiling entry function '[a-z_]+'" /tmp/dump/$v /tmp/log_$v.txt 2>/dev/null | uniq | head -12; done; ls /tmp/dump/loop-s1 | head; du -sh /tmp/dump/*
