/* LD_PRELOAD shim: set TCP_NODELAY on every TCP socket a process connects.
 *
 * Why: Mosquitto 2.0.11 sets TCP_NODELAY on the sockets it accepts (set_tcp_nodelay true) but not
 * on a bridge's outgoing socket, so each small message crossing a bridge waits for Nagle and the
 * peer's delayed ACK (~40 ms per hop). See docs/deployment.md for the measurement.
 *
 * Build:  gcc -shared -fPIC -O2 -o nodelay_shim.so nodelay_shim.c -ldl
 * Use:    LD_PRELOAD=/path/nodelay_shim.so mosquitto -c device.conf   (that one process only;
 *         never install it system-wide, e.g. in /etc/ld.so.preload)
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>

typedef int (*connect_fn)(int, const struct sockaddr *, socklen_t);

int connect(int fd, const struct sockaddr *addr, socklen_t len) {
    static connect_fn real_connect;
    if (!real_connect) real_connect = (connect_fn)dlsym(RTLD_NEXT, "connect");
    if (addr && (addr->sa_family == AF_INET || addr->sa_family == AF_INET6)) {
        int type = 0;
        socklen_t tlen = sizeof type;
        if (getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &tlen) == 0 && type == SOCK_STREAM) {
            int one = 1;
            int saved = errno;
            setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one); /* best effort */
            errno = saved;
        }
    }
    return real_connect(fd, addr, len);
}
