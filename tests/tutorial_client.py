# The classic Python socket tutorial's client, kept as it is (no newline sent,
# one recv per message) so that tests/client.rs can prove the default server
# (`--mode ack --framing read`) still serves it.  Usage: tutorial_client.py HOST PORT
import socket
import sys

host = sys.argv[1]
port = int(sys.argv[2])

s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
s.connect((host, port))
while True:
    msg = input("Enter message: ")
    if msg == "":
        break
    s.send(msg.encode())
    data = s.recv(1024)
    print(data.decode())
s.close()
