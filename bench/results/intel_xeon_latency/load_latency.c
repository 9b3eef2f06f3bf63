#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <stdint.h>
int main(int argc,char**argv){ size_t n=(size_t)atol(argv[1])/8; uint64_t*a=malloc(n*8); for(size_t i=0;i<n;i++)a[i]=i;
 srand(1); for(size_t i=n-1;i>0;i--){size_t j=((size_t)rand()*RAND_MAX+rand())%i; uint64_t t=a[i];a[i]=a[j];a[j]=t;}
 // a is a random permutation: cycle follow
 uint64_t p=0; struct timespec t0,t1; long steps=5000000; clock_gettime(CLOCK_MONOTONIC,&t0); for(long s=0;s<steps;s++)p=a[p]; clock_gettime(CLOCK_MONOTONIC,&t1);
 printf("%zu MB: %.1f ns/load (%lu)\n", n*8>>20, ((t1.tv_sec-t0.tv_sec)*1e9+(t1.tv_nsec-t0.tv_nsec))/steps, p); }
